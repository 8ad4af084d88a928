"""Checkpoints: exact resume after a crash, atomic plain-content files, clear errors."""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from prunekit.core.errors import CheckpointError
from prunekit.engine import (CHECKPOINT_NAME, Hook, TrainConfig, capture_rng_state, epoch_records,
                             load_checkpoint, read_jsonl, restore_rng_state, train)

from engine_testkit import CountingHook, TinyLoader, blobs, mlp, without_timings

EPOCHS, STEPS = 3, 4  # 48 samples in batches of 12


def _data():
    x, y = blobs(48)
    xv, yv = blobs(24, seed=5)
    # shuffle="global" draws from torch's global RNG: resume must restore it exactly.
    return TinyLoader(x, y, 12, shuffle="global"), TinyLoader(xv, yv, 12)


def _cfg(**kw):
    return TrainConfig(**{"epochs": EPOCHS, "lr": 0.05, "warmup_epochs": 0.5, "log_every": 3, **kw})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, optimizer):
    cfg = _cfg(optimizer=optimizer, nesterov=optimizer == "sgd")
    train_loader, val_loader = _data()
    # Dropout draws from the global RNG too.
    ref_model, ref_hook = mlp(dropout=0.3), CountingHook()
    ref = train(ref_model, train_loader, val_loader, cfg, hooks=[ref_hook], progress=False)

    ckpt, log = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    crash_step = STEPS + 2  # in the middle of the second epoch
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(mlp(dropout=0.3), train_loader, val_loader, cfg, hooks=[CountingHook(crash_at=crash_step)],
              ckpt_dir=ckpt, log_path=log, progress=False)
    assert load_checkpoint(ckpt / CHECKPOINT_NAME)["epoch"] == 0  # only epoch 1 is lost

    # A fresh process would build a differently initialised model: resume must overwrite it.
    model, hook = mlp(dropout=0.3, seed=123), CountingHook()
    res = train(model, train_loader, val_loader, cfg, hooks=[hook], ckpt_dir=ckpt, log_path=log,
                progress=False, resume=True)

    assert res.start_epoch == 1
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert without_timings(res.history) == without_timings(ref.history)
    assert res.best_val_acc == ref.best_val_acc and res.best_epoch == ref.best_epoch
    assert hook.steps == ref_hook.steps == EPOCHS * STEPS and torch.equal(hook.scale, ref_hook.scale)
    assert without_timings(epoch_records(log)) == without_timings(
        [{"event": "epoch", **h} for h in ref.history])
    assert any(r["event"] == "resume" and r["from_epoch"] == 1 for r in read_jsonl(log))


def test_checkpoint_file_is_plain_and_atomic(tmp_path):
    train_loader, val_loader = _data()
    model = mlp()
    train(model, train_loader, val_loader, _cfg(), hooks=[CountingHook()], ckpt_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp file left
    raw = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert raw["epoch"] == EPOCHS - 1 and raw["steps_per_epoch"] == STEPS
    for k, v in model.state_dict().items():
        assert torch.equal(raw["model"][k], v)
    assert raw["hooks"]["0"]["steps"] == EPOCHS * STEPS
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["cfg"] == _cfg().to_dict() and len(ckpt["history"]) == EPOCHS


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    train_loader, val_loader = _data()
    first = mlp()
    ref = train(first, train_loader, val_loader, _cfg(), ckpt_dir=tmp_path, progress=False)
    model = mlp(seed=9)
    res = train(model, train_loader, val_loader, _cfg(), ckpt_dir=tmp_path, progress=False, resume=True)
    assert res.start_epoch == EPOCHS and res.history == ref.history
    for a, b in zip(model.parameters(), first.parameters()):
        assert torch.equal(a, b)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    train_loader, val_loader = _data()
    a, b = mlp(), mlp()
    ra = train(a, train_loader, val_loader, _cfg(), progress=False)
    rb = train(b, train_loader, val_loader, _cfg(), ckpt_dir=tmp_path / "new", progress=False, resume=True)
    assert rb.start_epoch == 0 and any("does not exist" in n for n in rb.notes)
    assert without_timings(ra.history) == without_timings(rb.history)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign"])
def test_corrupt_checkpoint_raises_and_leaves_model_alone(tmp_path, damage):
    train_loader, val_loader = _data()
    train(mlp(), train_loader, val_loader, _cfg(epochs=1), ckpt_dir=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    model = mlp(seed=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match="delete it|not a prunekit"):
        train(model, train_loader, val_loader, _cfg(epochs=1), ckpt_dir=tmp_path, progress=False, resume=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _edit(ckpt: dict, what: str) -> None:
    if what == "epoch":
        ckpt["epoch"] = -5
    elif what == "model":
        ckpt["model"] = [1, 2]
    elif what == "hooks":
        ckpt["hooks"] = []
    elif what == "cfg":
        ckpt["meta_json"] = '{"cfg": [1], "history": []}'
    elif what == "rng":
        ckpt["rng"] = {}
    elif what == "scheduler":
        ckpt["scheduler"] = {"x": 1}
    elif what == "optimizer_params":
        ckpt["optimizer_params"] = [[0, 1]]
    elif what == "optimizer_state":  # a momentum buffer of another shape: the first step raised a RuntimeError
        ckpt["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)
    elif what == "lr_nan":  # a number where a number belongs, but not finite: training diverged at once
        ckpt["optimizer"]["param_groups"][0]["lr"] = float("nan")
    elif what == "scheduler_steps":  # a step count of another run: the schedule divided by zero
        ckpt["scheduler"]["last_epoch"] = -10 ** 30
    elif what == "epoch_past_end":  # a run that would count as finished without training
        ckpt["epoch"] = 10 ** 30
    else:
        ckpt["optimizer"]["param_groups"][0]["lr"] = "fast"


@pytest.mark.parametrize("what, fragment", [
    ("epoch", "epoch is not an integer"), ("model", "model state is not a mapping"),
    ("hooks", "hook states"), ("cfg", "training config"), ("rng", "random generator states"),
    ("scheduler", "scheduler state"), ("optimizer", "optimizer settings"),
    ("optimizer_params", "parameter names"),
    ("optimizer_state", "optimizer state of parameter '0.weight'"), ("lr_nan", "optimizer settings"),
    ("scheduler_steps", "scheduler has taken"), ("epoch_past_end", "epoch"),
])
def test_an_edited_checkpoint_with_a_valid_checksum_is_refused_before_anything_loads(tmp_path, what, fragment):
    """The checksum guards against damage, not edits: every entry's form is checked before any
    state is loaded, so the model stays as it was."""
    from prunekit.engine.checkpoint import payload_sha256

    train_loader, val_loader = _data()
    train(mlp(), train_loader, val_loader, _cfg(epochs=2), ckpt_dir=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    _edit(ckpt, what)
    ckpt["checksum"] = payload_sha256(ckpt)
    torch.save(ckpt, path)
    model = mlp(seed=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=fragment):
        train(model, train_loader, val_loader, _cfg(epochs=2), ckpt_dir=tmp_path, progress=False, resume=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Evil:
    """An arbitrary class: unpickling it would run code, so weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"format": "prunekit.train_checkpoint", "obj": Evil()}, path)
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        load_checkpoint(path)


def test_a_damaged_pickle_inside_an_intact_archive_is_called_damaged_not_hostile(tmp_path):
    """Bytes flipped in the pickled part (torch does not check the archive's CRCs) are damage."""
    import zipfile

    path = tmp_path / CHECKPOINT_NAME
    torch.save({"format": "prunekit.train_checkpoint", "epoch": 1}, path)
    with zipfile.ZipFile(path) as z:
        entries = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                data = data[:2] + b"\xff\xff\xff\xff" + data[6:]
            z.writestr(info, data)
    with pytest.raises(CheckpointError, match=r"is damaged \(its pickled contents cannot be read\)") as err:
        load_checkpoint(path)
    assert "could run code" not in str(err.value)


@pytest.mark.parametrize("change, fragment", [
    ("model", "does not fit the model|shapes do not fit"),
    ("cfg", "different TrainConfig"),
    ("hooks", "hooks"),
    ("loader", "steps per epoch"),
])
def test_mismatched_resume_raises(tmp_path, change, fragment):
    train_loader, val_loader = _data()
    train(mlp(), train_loader, val_loader, _cfg(epochs=2), hooks=[CountingHook()], ckpt_dir=tmp_path,
          progress=False)
    model, cfg, hooks, loader = mlp(), _cfg(epochs=2), [CountingHook()], train_loader
    if change == "model":
        model = mlp(hidden=8)
    elif change == "cfg":
        cfg = cfg.replace(lr=0.5)
    elif change == "hooks":
        hooks = [Hook()]
    else:
        loader = TinyLoader(train_loader.x, train_loader.y, 16)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=fragment):
        train(model, loader, val_loader, cfg, hooks=hooks, ckpt_dir=tmp_path, progress=False, resume=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class OtherStateHook(Hook):
    def __init__(self):
        self.seen = None

    def state_dict(self):
        return {"steps": 0}

    def load_state_dict(self, state):
        self.seen = state


def test_resuming_with_stateful_hooks_in_another_order_is_refused(tmp_path):
    # both hooks have state, so the set of saved indices matched and each got the other's state
    train_loader, val_loader = _data()
    train(mlp(), train_loader, val_loader, _cfg(epochs=2), hooks=[CountingHook(), OtherStateHook()],
          ckpt_dir=tmp_path, progress=False)
    other, counting = OtherStateHook(), CountingHook()
    with pytest.raises(CheckpointError, match=r"hooks\[0\].*CountingHook.*OtherStateHook.*same order"):
        train(mlp(), train_loader, val_loader, _cfg(epochs=2), hooks=[other, counting], ckpt_dir=tmp_path,
              progress=False, resume=True)
    assert other.seen is None and counting.steps == 0
    res = train(mlp(), train_loader, val_loader, _cfg(epochs=2), hooks=[counting, other], ckpt_dir=tmp_path,
                progress=False, resume=True)
    assert res.start_epoch == 2 and counting.steps == 2 * STEPS and other.seen == {"steps": 0}


def test_log_every_may_change_on_resume(tmp_path):
    train_loader, val_loader = _data()
    train(mlp(), train_loader, val_loader, _cfg(epochs=2), ckpt_dir=tmp_path, progress=False)
    res = train(mlp(), train_loader, val_loader, _cfg(epochs=2).replace(log_every=0), ckpt_dir=tmp_path,
                progress=False, resume=True)
    assert res.start_epoch == 2


class OpaqueStateHook(Hook):
    def state_dict(self):
        return {"fn": lambda: 1}

    def load_state_dict(self, state):
        pass


def test_non_plain_hook_state_is_refused_at_save(tmp_path):
    train_loader, val_loader = _data()
    with pytest.raises(CheckpointError, match=r"hooks\[1\].*function"):
        train(mlp(), train_loader, val_loader, _cfg(epochs=1), hooks=[Hook(), OpaqueStateHook()],
              ckpt_dir=tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    assert list(tmp_path.iterdir()) == []


def test_rng_state_round_trip():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_a_checkpoint_whose_masks_are_not_zeros_and_ones_leaves_a_fresh_model_unmasked(tmp_path):
    """Masks are checked, every one, before the first is put on the model being resumed."""
    from prunekit.surgery.masks import apply_mask, unstructured_mask

    train_loader, val_loader = _data()
    masked = mlp()
    for layer in (masked[0], masked[2]):
        apply_mask(layer, "weight", unstructured_mask(layer.weight, 0.5))
    train(masked, train_loader, val_loader, _cfg(epochs=2), ckpt_dir=tmp_path, progress=False)
    key = "2.parametrizations.weight.0.mask"
    _rewrite(tmp_path / CHECKPOINT_NAME,
             lambda ckpt: ckpt["model"].__setitem__(key, torch.full(ckpt["model"][key].shape, 0.5)))
    _refused_resume(tmp_path, train_loader, val_loader, "2.weight holds values other than 0 and 1", mlp(seed=4))


def _refused_resume(tmp_path, train_loader, val_loader, match, model, hooks=()):
    """Resuming into `model` raises a CheckpointError matching `match` and leaves the model as it
    was: the same state names (no mask put on it) and the same values."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=match):
        train(model, train_loader, val_loader, _cfg(epochs=2), hooks=list(hooks), ckpt_dir=tmp_path, progress=False,
              resume=True)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _ShortLoader:
    """Says it has 4 batches and yields 3 (an estimated length); raises in its `crash_at`-th pass."""

    def __init__(self, crash_at=None):
        x, y = blobs(24)
        self.batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
        self.crash_at, self.passes = crash_at, 0

    def __len__(self):
        return 4

    def __iter__(self):
        self.passes += 1
        if self.passes == self.crash_at:
            raise KeyboardInterrupt
        yield from self.batches


def test_a_loader_yielding_fewer_batches_than_its_length_still_resumes(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05)
    torch.manual_seed(0)
    whole = mlp()
    train(whole, _ShortLoader(), None, cfg, progress=False)
    torch.manual_seed(0)
    model = mlp()
    with pytest.raises(KeyboardInterrupt):
        train(model, _ShortLoader(crash_at=2), None, cfg, ckpt_dir=tmp_path, progress=False)
    torch.manual_seed(0)
    again = mlp()
    train(again, _ShortLoader(), None, cfg, ckpt_dir=tmp_path, resume=True, progress=False)
    for a, b in zip(again.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)


def _masked_run(tmp_path, hooks=()):
    from prunekit.surgery.masks import apply_mask, unstructured_mask
    train_loader, val_loader = _data()
    masked = mlp()
    apply_mask(masked[0], "weight", unstructured_mask(masked[0].weight, 0.5))
    train(masked, train_loader, val_loader, _cfg(epochs=2), hooks=list(hooks), ckpt_dir=tmp_path, progress=False)
    return train_loader, val_loader, tmp_path / CHECKPOINT_NAME


def _rewrite(path, edit):
    from prunekit.engine.checkpoint import payload_sha256
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    ckpt["checksum"] = payload_sha256(ckpt)
    torch.save(ckpt, path)


def test_a_mask_saved_without_its_masked_weight_is_refused_before_anything_loads(tmp_path):
    """The masked weight renamed to its plain name (mask buffer kept), checksum recomputed: the
    names compared as an unmasked model's passed, and the restore masked the model, then failed."""
    train_loader, val_loader, path = _masked_run(tmp_path)
    _rewrite(path, lambda c: c["model"].__setitem__("0.weight", c["model"].pop("0.parametrizations.weight.original")))
    _refused_resume(tmp_path, train_loader, val_loader, "weight mask without its masked weight", mlp(seed=4))


class _OwnAdam(Hook):
    """A hook that steps its own parameter with its own optimizer (the pattern docs/engine.md shows)."""

    def __init__(self, model):
        self.opt = torch.optim.Adam([model[2].bias], lr=0.01)

    def owned_parameters(self, model):
        return [model[2].bias]

    def after_backward(self, model, step):
        self.opt.step()
        self.opt.zero_grad()

    def state_dict(self):
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])


@pytest.mark.parametrize("edit", ["groups", "key"])
def test_a_hook_state_its_hook_refuses_puts_back_everything_already_loaded(tmp_path, edit):
    """The hook's own load_state_dict runs after the model (masks put on a fresh model) and the
    optimizer are loaded: its refusal was a bare ValueError/KeyError with the model changed; now
    one CheckpointError, the fresh model unmasked and unchanged, the optimizer as it was."""
    first = mlp()
    train_loader, val_loader, path = _masked_run(tmp_path, hooks=[_OwnAdam(first)])

    def damage(c):
        if edit == "groups":
            c["hooks"]["0"]["opt"]["param_groups"][0]["params"] = [0, 1]
        else:
            c["hooks"]["0"] = {"optimizer": 1}
    _rewrite(path, damage)
    model = mlp(seed=4)
    hook = _OwnAdam(model)
    _refused_resume(tmp_path, train_loader, val_loader, "cannot be loaded into this run", model, hooks=[hook])
    assert hook.opt.state_dict()["state"] == {}
