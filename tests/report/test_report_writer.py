"""Run reports: files, table rows and totals against hand numbers, escaping, plots, tolerance."""
from __future__ import annotations

import json
import warnings

import pytest
from PIL import Image

from prunekit.core.errors import ConfigError
from prunekit.report import write_report


def _latency(median: float) -> dict:
    return {"median_ms": median, "mean_ms": median, "std_ms": 0.1, "p10_ms": median - 0.1,
            "p90_ms": median + 0.1, "min_ms": median - 0.2, "max_ms": median + 0.3, "n": 20,
            "device": "cpu", "device_name": "Test CPU", "dtype": "float32", "batch": 1,
            "torch_version": "9.9", "settings": {}, "times_ms": []}


def _full() -> dict:
    return {
        "title": "ResNet <tiny> & friends",
        "method": "l1",
        "config": {"ratio": 0.5, "note": "</pre><b>x</b>"},
        "environment": {"torch": "9.9", "cuda": {"device_name": "None GPU"}},
        "cost_before": {"params": 1_234_567, "macs": 557_900_000, "latency": _latency(2.0)},
        "cost_after": {"params": 411_522, "macs": 123_400_000, "latency": _latency(0.8)},
        "accuracy_before": 0.9312,
        "accuracy_after": 0.9205,
        "accuracy_pruned_no_finetune": 0.61,
        "layers": [
            {"name": "conv1", "channels_before": 64, "channels_after": 32, "params_before": 1728,
             "params_after": 864, "macs_before": 1_769_472, "macs_after": 884_736},
            {"name": "<script>alert(1)</script>", "channels_before": 128, "channels_after": 48,
             "params_before": 73_728, "params_after": 13_824, "macs_before": 75_000_000, "macs_after": 14_000_000,
             "latency_ms_before": 0.5, "latency_ms_after": 0.25},
        ],
        "counting_convention": "1 MAC = one multiply-add; conv and linear only",
        "history": [{"step": 1, "macs": 300_000_000, "accuracy": 0.925, "val_accuracy": 0.9792},
                    {"step": 2, "macs": 200_000_000, "accuracy": 0.91}],
    }


def test_full_report_rows_and_totals(tmp_path):
    paths = write_report(tmp_path / "run", _full())
    md = paths.markdown.read_text()
    assert paths.markdown == tmp_path / "run" / "report.md" and paths.html.exists()
    # 411,522 / 1,234,567 = 0.3333 -> 33.3%, 3.00x; 123.4M / 557.9M = 0.2212 -> 22.1%, 4.52x.
    assert "| params | 1.23M (1,234,567) | 412K (411,522) | 33.3% | 3.00x fewer params |" in md
    assert "| MACs | 558M (557,900,000) | 123M (123,400,000) | 22.1% | 4.52x fewer MACs |" in md
    # Latency 2.0 -> 0.8 ms: 40.0% of the time, 2.50x faster.
    assert "| latency, median (ms) | 2.00 | 0.800 | 40.0% | 2.50x faster |" in md
    assert "| before | 93.12% |" in md and "| after | 92.05% |" in md
    assert "| pruned, no fine-tune | 61.00% |" in md and "| delta (after - before) | -1.07 pp |" in md
    assert "| conv1 | 64 | 32 | 50.0% | 1.73K | 864 | 1.77M | 885K | n/a | n/a |" in md
    assert "| 37.5% | 73.7K | 13.8K | 75M | 14M | 0.500 | 0.250 |" in md
    assert "Counting convention: 1 MAC = one multiply-add; conv and linear only" in md
    assert "| 1 | 300M | 92.50% | 97.92% |" in md  # val_accuracy as a percentage too (was 0.9792)
    assert "| cuda.device_name | None GPU |" in md and "| device | Test CPU | Test CPU |" in md
    assert '"ratio": 0.5' in md


def test_html_escapes_user_text(tmp_path):
    page = write_report(tmp_path, _full()).html.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>ResNet &lt;tiny&gt; &amp; friends</title>" in page
    assert "&lt;/pre&gt;&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert '<td class="num">4.52x fewer MACs</td>' in page
    assert page.count("<table>") == 6  # accuracy, totals, layers, history, latency, environment
    md = (tmp_path / "report.md").read_text()
    assert "\\<script\\>alert(1)\\</script\\>" in md  # Markdown escapes it too


def test_plots_are_valid_pngs_and_linked(tmp_path):
    paths = write_report(tmp_path, _full())
    assert [p.name for p in paths.plots] == ["accuracy_vs_macs.png", "layer_widths.png"]
    page = paths.html.read_text()
    md = paths.markdown.read_text()
    for p in paths.plots:
        with Image.open(p) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
        assert f'<img src="{p.name}"' in page and f"]({p.name})" in md


def test_empty_result_does_not_crash(tmp_path):
    paths = write_report(tmp_path, {})
    md = paths.markdown.read_text()
    assert paths.plots == []
    assert "| params | n/a | n/a | n/a | n/a |" in md and "| before | n/a |" in md
    assert "Counting convention: not recorded" in md and "latency" not in md
    assert "Pruning report: unknown method" in md and paths.html.exists()


def test_partial_layers_and_totals_from_layer_sums(tmp_path):
    result = {"method": "x", "accuracy_after": 91.0,  # given as a percentage
              "layers": [{"name": "a", "channels_before": 10, "params_before": 300, "params_after": 100},
                         {"name": "b", "params_before": 700, "params_after": 400}]}
    paths = write_report(tmp_path, result)
    md = paths.markdown.read_text()
    # No whole-model count: totals are layer sums, 1000 -> 500, marked with * (escaped in Markdown).
    assert "| params | 1K (1,000) \\* | 500 (500) \\* | 50.0% | 2.00x fewer params |" in md
    assert "<td class=\"num\">1K (1,000) *</td>" in paths.html.read_text()
    assert "sums over the listed layers" in md
    assert "| a | 10 | n/a | n/a |" in md and "| after | 91.00% |" in md
    assert [p.name for p in paths.plots] == ["layer_widths.png"]  # no MACs: no accuracy plot


def test_reads_result_json_and_reports_missing_file(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps(_full()))
    paths = write_report(tmp_path)
    assert "4.52x fewer MACs" in paths.markdown.read_text()
    with pytest.raises(ConfigError, match="result.json does not exist"):
        write_report(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "result.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        write_report(tmp_path / "bad")
    with pytest.raises(ConfigError, match="result dict"):
        write_report(tmp_path, [1, 2])


def test_weight_masks_line_reports_counted_zeros(tmp_path):
    sparsity = {"tensors": {}, "masked": {"zeros": 7, "numel": 10, "sparsity": 0.7},
                "weights": {"zeros": 7, "numel": 20, "sparsity": 0.35}}
    paths = write_report(tmp_path, {"title": "t", "method": "slr", "sparsity": sparsity})
    assert "Weight masks: 70.0% of 10 masked weights are zero" in paths.markdown.read_text()
    paths = write_report(tmp_path / "dense", {"title": "t", "method": "magnitude"})
    assert "Weight masks" not in paths.markdown.read_text()
    kinds = {"tensors": {"a.weight": {"kind": "2:4"}, "b.weight": {"kind": "2:4"}, "c.weight": {"kind": "irregular"}},
             "masked": {"zeros": 7, "numel": 10, "sparsity": 0.7}}
    paths = write_report(tmp_path / "kinds", {"title": "t", "method": "slr", "sparsity": kinds})
    assert "are zero (counted in the final weights); mask kinds: 2:4 on 2 tensors; irregular on 1 tensor" in \
        paths.markdown.read_text()
    paths = write_report(tmp_path / "partial", {"title": "t", "method": "slr", "sparsity": {"masked": {"numel": 10}}})
    assert "Weight masks: n/a of 10 masked weights are zero" in paths.markdown.read_text()


@pytest.mark.parametrize("change", [{"cost_before": "x"}, {"layers": [1, 2]},
                                    {"cost_after": {"params": 1, "macs": float("inf")}},
                                    {"layers": [{"name": "conv", "channels_before": float("inf"), "channels_after": 4}]}],
                         ids=["cost", "layers", "inf", "inf-width"])
def test_a_hand_edited_result_json_of_the_wrong_layout_is_one_config_error(tmp_path, change):
    (tmp_path / "result.json").write_text(json.dumps(_full()))
    write_report(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "result.json").write_text(json.dumps({**_full(), **change}))
    with warnings.catch_warnings():  # the one error only: no plotting library's warning before it
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="result.json does not have the layout prunekit writes"):
            write_report(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "result.json"}
    assert after == {k: v for k, v in before.items() if k != "result.json"}  # the last good report stays whole


@pytest.mark.parametrize("plot", ["pareto", "accuracy", "widths"])
def test_a_dollar_in_a_plot_title_is_text_not_math(tmp_path, plot):
    from prunekit.report import plots

    title = r"prunekit compare: run$\frac$2"  # a compare recipe's name goes into the Pareto plot's title
    path = tmp_path / "p.png"
    drawn = {"pareto": lambda: plots.plot_pareto(path, {"a": (1e6, 0.9, None)}, ["a"], title=title),
             "accuracy": lambda: plots.plot_accuracy_vs_macs(path, before=(1e6, 0.9), title=title),
             "widths": lambda: plots.plot_layer_widths(path, ["conv"], [8], [4], title=title)}[plot]()
    assert drawn == path and path.stat().st_size > 1000


def test_a_latency_change_the_interleaved_rounds_do_not_show_is_not_called_a_speed_up(tmp_path):
    """Medians 0.85 -> 0.70 ms, but the pruned model was faster in only 11 of 20 paired rounds
    (load hit both alike): a sign test cannot tell that from noise, so no speed-up is claimed."""
    from prunekit.cli.rundir import _latency_line
    from prunekit.cost.latency_results import paired_change

    noisy = _full()
    before = [0.85 + (0.5 if i % 2 else 0.0) for i in range(20)]
    after = [b - 0.15 if i < 11 else b + 0.15 for i, b in enumerate(before)]
    noisy["cost_before"]["latency"] = {**_latency(0.85), "times_ms": before}
    noisy["cost_after"]["latency"] = {**_latency(0.70), "times_ms": after}
    assert paired_change(before, after) == {"faster_rounds": 11, "rounds": 20, "p_value": pytest.approx(0.824, abs=1e-3),
                                            "measured": False}
    md = write_report(tmp_path / "noisy", noisy).markdown.read_text()
    assert "| 0.850 | 0.700 | 82.4% | no measurable change (faster in 11 of 20 interleaved rounds) |" in md
    line = _latency_line({"before": noisy["cost_before"]["latency"], "after": noisy["cost_after"]["latency"]})
    assert line.endswith("(1.21x; no measurable change: faster in 11 of 20 interleaved rounds, as noise would be)")
    clear = [b - 0.15 for b in before]  # faster in every round
    assert paired_change(before, clear)["measured"]
    assert paired_change(before[:5], clear[:5])["measured"] is None  # 5 rounds: no test can tell
    noisy["cost_after"]["latency"]["times_ms"] = clear
    assert "| 82.4% | 1.21x faster |" in write_report(tmp_path / "clear", noisy).markdown.read_text()


def test_the_widths_plot_is_left_out_above_its_bar_limit(tmp_path):
    from prunekit.report import plots

    n = plots.MAX_BARS + 1
    assert plots.plot_layer_widths(tmp_path / "w.png", [f"l{i}" for i in range(n)], [8] * n, [4] * n) is None
    assert not (tmp_path / "w.png").exists()


def test_the_pruners_notes_the_multiple_used_and_the_latency_timing_settings_are_in_the_report(tmp_path):
    metrics = {"notes": ["widths rounded to multiples of 2 instead of 16: <see>", "latency target 0.6 missed"],
               "rounding": {"round_to": 16, "multiple": 2, "tried": []},
               "latency": {"target": 0.6, "measured_fraction": 0.633, "tolerance": 0.05,
                           "settings": {"device": "cpu", "dtype": "float32", "batch_size": 16, "threads": 1,
                                        "channels_last": True}}}
    paths = write_report(tmp_path, {"title": "t", "method": "magnitude", "prune_metrics": metrics})
    md, html = paths.markdown.read_text(), paths.html.read_text()
    assert "## Notes from pruning" in md and "widths rounded to multiples of 2 instead of 16" in md
    assert "latency target 0.6 missed" in md and "&lt;see&gt;" in html
    assert "Widths rounded to multiples of 2 (round_to=16 asked for)" in md
    assert ("measured while pruning: 0.633 (tolerance 0.05; timed at device cpu, dtype float32, batch size 16, "
            "threads 1, channels-last)") in md
    plain = write_report(tmp_path / "plain", {"title": "t", "method": "magnitude",
                                              "prune_metrics": {"rounding": {"round_to": 16, "multiple": 16}}})
    text = plain.markdown.read_text()
    assert "Notes from pruning" not in text and "Widths rounded to multiples of 16;" in text
