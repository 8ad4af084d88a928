"""The run directory's report: its tables read as tables."""
import re

from prunekit.evolve import EvolveConfig, digits_task
from prunekit.evolve.report import write_run
from prunekit.evolve.search import SearchState
from prunekit.importance.evolved.space import SEEDS

_CELL_END = re.compile(r"(?<!\\)\|")  # GitHub ends a table cell at every unescaped pipe, code spans included


def test_formulas_with_absolute_values_stay_in_their_table_cell(tmp_path):
    """abs is written |x|: unescaped, the pipes of `|g_mean(P) - g_mean(Q)| / ...` split the formula
    over three cells of a three-column table."""
    text = SEEDS["abs_snr"]
    key = f"digits|0|{text}"
    state = SearchState(0, [text] * 4, {key: {"acc": 0.5}}, [text],
                        [{"generation": 0, "best": 0.5, "mean": 0.5, "median": 0.5}])
    cfg = EvolveConfig(tasks=[digits_task()], population=4, parents=2, reeval_seeds=0)
    report = write_run(tmp_path, cfg, state, []).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 1 |"))
    assert _CELL_END.split(row)[1:-1] == [" 1 ", " 0.5000 ", r" `\|g_mean(P) - g_mean(Q)\| / (std(P) + std(Q) + 1e-4)` "]


def test_one_reevaluation_seed_shows_no_spread(tmp_path):
    """With one fresh seed the std is undefined; the table printed '± 0.00'."""
    text = SEEDS["abs_snr"]
    state = SearchState(0, [text] * 4, {f"digits|0|{text}": {"acc": 0.5}}, [text],
                        [{"generation": 0, "best": 0.5, "mean": 0.5, "median": 0.5}])
    cfg = EvolveConfig(tasks=[digits_task()], population=4, parents=2, reeval_seeds=0)
    rows = [{"label": "evolved #1", "fitness": 0.61, "tasks": {"digits": {"mean": 0.61, "std": 0.0, "accs": [0.61]}}}]
    report = write_run(tmp_path, cfg, state, rows).read_text()
    assert "Re-evaluated with 1 fresh seed (val accuracy)" in report and "| evolved #1 | 0.6100 | 61.00 |" in report
    rows[0]["tasks"]["digits"].update(accs=[0.6, 0.62], std=0.0141)
    assert "61.00 ± 1.41" in write_run(tmp_path, cfg, state, rows).read_text()
