"""Methods that train (SLR/ADMM, Gator) checkpoint every epoch and resume to the same result."""
from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.data import DataConfig, load_data
from prunekit.engine import TrainConfig
from prunekit.models import create_model
from prunekit.testing.loaders import Interrupted, InterruptingLoader


@pytest.fixture(scope="module")
def digits():
    """Three training batches and one validation batch of digits: enough to train, and fast."""
    bundle = load_data(DataConfig(name="digits", batch_size=64, val_fraction=0.1))
    bundle.train.set_epoch(0)
    train = [(x.clone(), y.clone()) for (x, y), _ in zip(bundle.train, range(3))]
    return train, [next(iter(bundle.val))]


METHODS = {
    "admm": prunekit.SLRConfig(sparsity_type="filter", sparsity=0.5, optimization="admm", epochs=2, retrain_epochs=2),
    "gator": prunekit.GatorConfig(target=0.6, epochs=2, finetune_epochs=2),
}


def _prune(digits, method, ckpt_dir, loader, resume=False):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    cfg = TrainConfig(epochs=1, optimizer="adamw", lr=3e-3, log_every=0)
    result = prunekit.prune_(model, METHODS[method], torch.zeros(1, 1, 8, 8), train_loader=loader,
                             val_loader=digits[1], train_config=cfg, ckpt_dir=ckpt_dir, resume=resume)
    return model, result


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("phase", ["first", "second"])
def test_a_crash_in_either_training_phase_resumes_to_the_same_model(digits, tmp_path, method, phase):
    counting = InterruptingLoader(digits[0])
    ref_model, ref = _prune(digits, method, tmp_path / "ref", counting)
    # the second epoch of the first training phase, or the last pass (the second phase's last epoch)
    crash_at = 2 if phase == "first" else counting.passes
    with pytest.raises(Interrupted):
        _prune(digits, method, tmp_path / "run", InterruptingLoader(digits[0], crash_at))
    assert (tmp_path / "run").is_dir()
    resumed = InterruptingLoader(digits[0])
    model, result = _prune(digits, method, tmp_path / "run", resumed, resume=True)
    # only the epoch that crashed is trained again: a finished phase or epoch is not
    assert resumed.passes == counting.passes - (crash_at - 1), (resumed.passes, counting.passes)
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    assert result.plan.to_dict() == ref.plan.to_dict()


@pytest.mark.parametrize("method, other", [
    ("admm", {"sparsity": 0.3, "optimization": "slr"}), ("gator", {"cost": "params"})])
def test_a_resume_with_another_method_config_is_refused_before_anything_is_restored(digits, tmp_path, method, other):
    """train() refused another TrainConfig but took another SLRConfig/GatorConfig and mixed the two
    runs (max weight difference 1.0 from a fresh run of the second config)."""
    from dataclasses import replace

    from prunekit.core.errors import CheckpointError

    with pytest.raises(Interrupted):
        _prune(digits, method, tmp_path / "run", InterruptingLoader(digits[0], 2))
    saved = METHODS[method]
    METHODS[method] = replace(saved, **other)
    try:
        name = type(saved).__name__
        with pytest.raises(CheckpointError, match=f"written with a different {name} \\({sorted(other)[0]}: saved"):
            _prune(digits, method, tmp_path / "run", InterruptingLoader(digits[0]), resume=True)
    finally:
        METHODS[method] = saved
    _prune(digits, method, tmp_path / "run", InterruptingLoader(digits[0]), resume=True)  # the same config resumes


class _Shuffled(InterruptingLoader):
    """Batches in an order seeded by this loader's own pass count (as a loader reshuffled per
    epoch), which a resumed process starts again from zero."""

    def __iter__(self):
        self.passes += 1
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.passes))
        for i, k in enumerate(order.tolist()):
            if self.passes == self.crash_at and i == 1:
                raise Interrupted
            yield self.batches[k]


def test_a_resumed_slr_run_reports_the_scores_of_the_hard_pruned_model_it_retrained(digits, tmp_path):
    """BatchNorm recalibration (on one batch) runs again on resume, on another batch; the retrain
    checkpoint restores the statistics the run trained with, so the model is the same, and the
    scores reported for the hard-pruned model are now those of the run's first recalibration.
    (This loader reshuffles by its own pass count, so the resumed epochs see other orders: the
    model is compared in the test above, with a loader that resumes exactly.)"""
    config = prunekit.SLRConfig(sparsity=0.5, epochs=1, retrain_epochs=2, recalibrate_bn=True, recalibrate_batches=1)

    def prune(ckpt_dir, loader, resume=False):
        torch.manual_seed(0)
        model = create_model("small_cnn", num_classes=10)
        cfg = TrainConfig(epochs=1, optimizer="adamw", lr=3e-3, log_every=0)
        return model, prunekit.prune_(model, config, torch.zeros(1, 1, 8, 8), train_loader=loader,
                                      val_loader=digits[1], train_config=cfg, ckpt_dir=ckpt_dir, resume=resume)

    batches = digits[0] * 3
    _, ref = prune(tmp_path / "ref", _Shuffled(batches))
    with pytest.raises(Interrupted):
        prune(tmp_path / "run", _Shuffled(batches, crash_at=4))  # in the retrain phase's second epoch
    _, result = prune(tmp_path / "run", _Shuffled(batches), resume=True)
    assert result.metrics["hard_pruned_bn"] == ref.metrics["hard_pruned_bn"]
    assert result.metrics["hard_pruned"] == ref.metrics["hard_pruned"]


def test_a_resumed_slr_run_without_a_retrain_checkpoint_scores_its_own_recalibration(digits, tmp_path):
    """With no retraining the model returned is the new recalibration's, so the scores are measured
    again, not read back from the first run."""
    config = prunekit.SLRConfig(sparsity=0.5, epochs=1, retrain_epochs=0, recalibrate_bn=True, recalibrate_batches=1)

    def prune(loader, resume=False):
        torch.manual_seed(0)
        model = create_model("small_cnn", num_classes=10)
        cfg = TrainConfig(epochs=1, optimizer="adamw", lr=3e-3, log_every=0)
        return model, prunekit.prune_(model, config, torch.zeros(1, 1, 8, 8), train_loader=loader,
                                      val_loader=digits[1], train_config=cfg, ckpt_dir=tmp_path, resume=resume)

    from prunekit.engine.evaluate import evaluate
    prune(_Shuffled(digits[0] * 3))
    model, result = prune(_Shuffled(digits[0] * 3), resume=True)  # recalibrates on pass 1's batch, not pass 2's
    assert result.metrics["hard_pruned_bn"] == evaluate(model, digits[1])


def test_filter_sparsity_names_the_zeroed_filters_removal_could_not_take(digits):
    """On small_cnn the projection zeroes filters of layers joined by a residual add; only channels
    zero in every joined layer can go, and the rest stayed as zero filters without a word."""
    from prunekit.methods.slr.pipeline import zero_filters

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    cfg = TrainConfig(epochs=1, optimizer="adamw", lr=3e-3, log_every=0)
    result = prunekit.prune_(model, prunekit.SLRConfig(sparsity_type="filter", sparsity=0.5, epochs=1),
                             torch.zeros(1, 1, 8, 8), train_loader=digits[0], train_config=cfg)
    left = zero_filters(model)  # the oracle: all-zero output filters of the model handed back
    assert left and result.metrics["zero_filters_left"] == left
    assert any(f"{sum(left.values())} zeroed filter(s) could not be removed" in n for n in result.metrics["notes"])
