"""benchmarks/evolve_transfer.py --report: the claim is checked only where every compared arm has a spread."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "evolve_transfer.py"


@pytest.fixture(scope="module")
def transfer():
    spec = importlib.util.spec_from_file_location("evolve_transfer_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _file(tmp_path, accs: dict[str, list[float]]) -> str:
    recs = [{"arm": arm, "seed": s, "val_acc": a, "test_acc": a, "pruned_val_acc": a / 2}
            for arm, xs in accs.items() for s, a in enumerate(xs)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"settings": {"ratio": 0.4}, "records": recs}))
    return str(path)


def test_one_seed_shows_no_spread_and_checks_no_claim(transfer, tmp_path, capsys):
    transfer.report([_file(tmp_path, {"ga_func2": [0.86], "seed_l2": [0.85], "random": [0.80]})])
    out = capsys.readouterr().out
    assert "±" not in out
    assert "| ga_func2 | 1 | 86.00 | 86.00 | 43.00 (1) |" in out
    assert "Claim not checked: ga_func2, random, seed_l2 ran one seed" in out
    assert "True" not in out and "False" not in out


def test_two_seeds_check_the_claim_by_hand(transfer, tmp_path, capsys):
    # Eq. 3: 0.86, 0.88 (mean 0.87, std 0.01414); seed_l2: 0.88, 0.90 (mean 0.89); random 0.80, 0.82 (mean 0.81)
    transfer.report([_file(tmp_path, {"ga_func2": [0.86, 0.88], "seed_l2": [0.88, 0.90], "random": [0.80, 0.82]})])
    out = capsys.readouterr().out
    assert "| ga_func2 | 2 | 87.00 ± 1.41 | 87.00 ± 1.41 |" in out
    assert "on test: -2.00 points" in out and "Eq. 3 - random: +6.00 points" in out
    # 0.87 >= 0.89 - 0.0141 is False; 0.87 + 0.0141 >= 0.8759 is True; 0.06 > 2 * 0.0141 is True
    assert "(std 1.41 / 1.41): False; 1-std bands overlap: True; above random by more than 2 std: True" in out
