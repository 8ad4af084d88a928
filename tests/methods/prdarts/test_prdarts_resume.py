"""A PR-DARTS search checkpoints every epoch of its three phases and resumes to exactly the
search that was never stopped: alphas, supernet, genotype, history and the alpha log."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit.core.errors import CheckpointError, ConfigError
from prunekit.engine.train import TIMING_KEYS
from prunekit.methods.prdarts import PRDartsConfig, search
from prunekit.testing.loaders import Interrupted, InterruptingLoader


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


TRAIN, VAL = _data(3, 0), _data(2, 1)  # 3 steps an epoch over 2 alpha batches: each epoch starts mid-pass


def _cfg(unrolled: bool = False, **kw) -> PRDartsConfig:
    return PRDartsConfig(**{"channels": 2, "layers": 3, "steps": 1, "multiplier": 1, "density": 0.3,
                            "pretrain_epochs": 2, "score_epochs": 2, "finetune_epochs": 2, "unrolled": unrolled,
                            "arch_during_scores": True, "arch_lr": 3e-2, **kw})


def _search(cfg, loader, root, resume=False):
    return search(cfg, loader, VAL, num_classes=3, device="cpu", out_dir=root / "out", ckpt_dir=root / "ckpt",
                  resume=resume)


def _plain(history):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The search never stopped, first and second order: (result, run folder, passes over the train loader)."""
    runs = {}
    for unrolled in (False, True):
        root, counting = tmp_path_factory.mktemp(f"ref-{unrolled}"), InterruptingLoader(TRAIN)
        runs[unrolled] = _search(_cfg(unrolled), counting, root), root, counting.passes
    return runs


@pytest.mark.parametrize("unrolled", [False, True])
@pytest.mark.parametrize("crash_at", [2, 3, 4, 6])  # pretrain epoch 2, scores epoch 1 and 2, finetune epoch 2
def test_an_interrupted_search_resumes_to_the_uninterrupted_one(tmp_path, uninterrupted, unrolled, crash_at):
    cfg = _cfg(unrolled)
    ref, ref_root, ref_passes = uninterrupted[unrolled]
    with pytest.raises(Interrupted):
        _search(cfg, InterruptingLoader(TRAIN, crash_at), tmp_path / "run")
    resumed = InterruptingLoader(TRAIN)
    got = _search(cfg, resumed, tmp_path / "run", resume=True)
    # finished phases and epochs are read back, not trained again: only the epoch that crashed runs again
    assert resumed.passes == ref_passes - (crash_at - 1), (resumed.passes, ref_passes)
    for a, b in zip(ref.supernet.alphas(), got.supernet.alphas()):
        assert torch.equal(a, b)
    ref_state, state = ref.supernet.state_dict(), got.supernet.state_dict()
    assert ref_state.keys() == state.keys() and all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    assert got.genotype == ref.genotype and got.nonzeros == ref.nonzeros
    assert _plain(got.history) == _plain(ref.history)
    for name in ("alphas.jsonl", "genotype.json"):  # the alpha log holds each epoch once, as uninterrupted
        assert (tmp_path / "run" / "out" / name).read_text() == (ref_root / "out" / name).read_text(), name


def test_resume_of_a_finished_search_trains_nothing_and_reads_the_result_back(tmp_path):
    cfg = _cfg(False, pretrain_epochs=1, score_epochs=1, finetune_epochs=1)
    ref = _search(cfg, InterruptingLoader(TRAIN), tmp_path)
    again = InterruptingLoader(TRAIN)
    got = _search(cfg, again, tmp_path, resume=True)
    assert again.passes == 0
    assert got.genotype == ref.genotype and _plain(got.history) == _plain(ref.history)
    assert all(torch.equal(a, b) for a, b in zip(ref.supernet.alphas(), got.supernet.alphas()))


@pytest.mark.parametrize("change", [{"arch_lr": 1e-3}, {"unrolled": True}, {"density": 0.5}, {"finetune_epochs": 3}])
def test_resuming_with_other_settings_is_refused(tmp_path, change):
    cfg = _cfg(False)
    with pytest.raises(Interrupted):
        _search(cfg, InterruptingLoader(TRAIN, 2), tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    key = next(iter(change))
    with pytest.raises(CheckpointError, match=f"a run with other settings.*{key}: saved .* vs now .*same settings"):
        _search(_cfg(**change), InterruptingLoader(TRAIN), tmp_path, resume=True)
    assert {p: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()} == before


def test_resuming_with_another_alpha_split_is_refused(tmp_path):
    cfg = _cfg(False)
    with pytest.raises(Interrupted):
        _search(cfg, InterruptingLoader(TRAIN, 2), tmp_path)
    with pytest.raises(CheckpointError, match=r"validation .* 3 batches .* had 2;.*same data"):
        search(cfg, TRAIN, _data(3, 1), num_classes=3, device="cpu", ckpt_dir=tmp_path / "ckpt", resume=True)


def test_a_damaged_search_checkpoint_is_one_clear_error(tmp_path):
    cfg = _cfg(False)
    with pytest.raises(Interrupted):
        _search(cfg, InterruptingLoader(TRAIN, 4), tmp_path)
    last = tmp_path / "ckpt" / "pretrain" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write the disk did not finish
    with pytest.raises(CheckpointError, match=r"pretrain/last\.pt is corrupt"):
        _search(cfg, InterruptingLoader(TRAIN), tmp_path, resume=True)
    (tmp_path / "ckpt" / "settings.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="settings.json"):
        _search(cfg, InterruptingLoader(TRAIN), tmp_path, resume=True)
    (tmp_path / "ckpt" / "settings.json").unlink()  # phase checkpoints without the settings they were made with
    with pytest.raises(CheckpointError, match="settings.json"):
        _search(cfg, InterruptingLoader(TRAIN), tmp_path, resume=True)


def test_resume_needs_a_checkpoint_folder_and_starts_over_without_one(tmp_path):
    cfg = _cfg(False, pretrain_epochs=1, score_epochs=0, finetune_epochs=0)
    with pytest.raises(ConfigError, match="resume=True needs ckpt_dir"):
        search(cfg, TRAIN, VAL, num_classes=3, device="cpu", resume=True)
    ref = search(cfg, TRAIN, VAL, num_classes=3, device="cpu")
    fresh = _search(cfg, InterruptingLoader(TRAIN), tmp_path, resume=True)  # nothing there yet: from the start
    assert fresh.genotype == ref.genotype and (tmp_path / "ckpt" / "pretrain" / "last.pt").is_file()


def test_a_new_search_replaces_the_checkpoints_it_finds(tmp_path):
    """Without resume a search starts over: a later resume never mixes in an older search's phases."""
    cfg = _cfg(False, pretrain_epochs=1, score_epochs=1, finetune_epochs=1)
    _search(_cfg(False, pretrain_epochs=1, score_epochs=1, finetune_epochs=1, seed=1), InterruptingLoader(TRAIN), tmp_path)
    with pytest.raises(Interrupted):
        _search(cfg, InterruptingLoader(TRAIN, 2), tmp_path)
    assert not (tmp_path / "ckpt" / "finetune" / "last.pt").exists()
    ref = _search(cfg, InterruptingLoader(TRAIN), tmp_path / "ref")
    got = _search(cfg, InterruptingLoader(TRAIN), tmp_path, resume=True)
    assert got.genotype == ref.genotype and _plain(got.history) == _plain(ref.history)
    assert json.loads((tmp_path / "ckpt" / "settings.json").read_text())["config"]["seed"] == 0


def test_the_alpha_log_keeps_its_saved_epochs_past_a_line_that_is_not_utf8(tmp_path):
    from prunekit.methods.prdarts.checkpoints import trim_alpha_log

    cfg = _cfg(False, pretrain_epochs=1, score_epochs=1, finetune_epochs=1)
    _search(cfg, InterruptingLoader(TRAIN), tmp_path)
    log = tmp_path / "out" / "alphas.jsonl"
    good = log.read_bytes()
    log.write_bytes(good + b"\xff\xfe{\n")
    trim_alpha_log(tmp_path / "out", {"pretrain": 1, "scores": 1, "finetune": 1})
    assert log.read_bytes() == good
