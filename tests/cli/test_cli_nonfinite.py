"""NaN and infinity in any numeric recipe field: exit 2, one line, nothing written (no run directory)."""
from __future__ import annotations

import json
import math

import pytest

from prunekit.cli.main import cli
from prunekit.core.errors import ConfigError

NON_FINITE = [
    ("method.macs_fraction=.nan", "macs_fraction=nan"),
    ("method.channel_ratio=.nan", "channel_ratio=nan"),
    ("method.max_ratio=.inf", "max_ratio=inf"),
    ("train.lr=.nan", "lr=nan"),
    ("train.lr=.inf", "lr=inf"),
    ("finetune.momentum=-.inf", "momentum=-inf"),
    ("data.val_fraction=.nan", "val_fraction=nan"),
    ("model.kwargs={width: .nan}", "kwargs.width=nan"),
]


@pytest.mark.parametrize("override, needle", NON_FINITE, ids=[o for o, _ in NON_FINITE])
def test_non_finite_values_fail_before_any_file_is_written(runner, tmp_path, monkeypatch, override, needle):
    monkeypatch.chdir(tmp_path)
    args = ["run", "train.epochs=1", "finetune.epochs=1", override]
    if override.startswith("method.channel_ratio"):
        args.append("method.macs_fraction=null")
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0] and "not a finite number" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_api_configs_refuse_nan_targets():
    import prunekit

    with pytest.raises(ConfigError, match="macs_fraction=nan"):
        prunekit.MagnitudeConfig(macs_fraction=math.nan)
    with pytest.raises(ConfigError, match="channel_ratio=nan"):
        prunekit.MagnitudeConfig(channel_ratio=float("nan"))
    with pytest.raises(ConfigError, match="lr=nan"):
        prunekit.TrainConfig(lr=float("nan"))


def test_a_channel_ratio_above_max_ratio_says_it_was_capped(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(cli, ["run", "train.epochs=1", "finetune=null", "method.macs_fraction=null",
                                 "method.channel_ratio=0.95", "method.max_ratio=0.5", "eval.latency=false",
                                 "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "note: channel_ratio=0.95 was capped at max_ratio=0.5" in result.stdout
    saved = json.loads((out / "result.json").read_text())
    assert any("capped at max_ratio=0.5" in n for n in saved["prune_metrics"]["notes"])
    assert saved["layers"]
    for row in saved["layers"]:  # and the cap held: no layer lost more than half its channels
        assert row["channels_after"] >= math.ceil(0.5 * row["channels_before"]), row
