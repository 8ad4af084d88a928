"""Write a run's report (report.md, report.html and PNG plots) from its result dict.

A run directory holds config.json/.yaml, plan.json, metrics.jsonl, result.json and this report.
`write_report` builds one document (sections of paragraphs, tables, images and code) from a
`ReportInput` and renders it twice, so the Markdown and the HTML say the same thing. Only what is
present is shown: every key except "layers" rows' "name" is optional, and a missing value prints
as "n/a" instead of failing.

Accuracy values are fractions in [0, 1] (a value above 1 is read as a percentage). Params and MACs
are plain counts; "counting_convention" says how MACs were counted (e.g. "1 MAC = 1 multiply-add;
conv and linear only") and is printed under the totals because numbers without it are ambiguous.

>>> import tempfile
>>> paths = write_report(tempfile.mkdtemp(), {"method": "l1", "cost_before": {"macs": 4e8},
...                                            "cost_after": {"macs": 1e8}})
>>> "4.00x fewer" in paths.markdown.read_text()
True
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, TypedDict, Union

from ..core.errors import ConfigError, read_json
from . import plots
from .tables import (NA, fmt_accuracy, fmt_count, fmt_delta_pp, fmt_int, fmt_ms, fmt_pct, fmt_reduction,
                     html_table, markdown_table, md_escape)


class CostSummary(TypedDict, total=False):
    """Whole-model cost: parameter count, MAC count, and a LatencyResult.to_dict() or None."""
    params: float
    macs: float
    latency: Optional[dict]


class LayerRow(TypedDict, total=False):
    """One prunable layer; latency columns appear only if some row has them."""
    name: str
    channels_before: int
    channels_after: int
    params_before: float
    params_after: float
    macs_before: float
    macs_after: float
    latency_ms_before: float
    latency_ms_after: float


class ReportInput(TypedDict, total=False):
    """What `write_report` reads (result.json has this layout). History entries are dicts with
    any of "step", "macs", "params", "accuracy", "latency_ms"; those with macs and accuracy are plotted."""
    title: str
    method: str
    config: dict
    environment: dict
    cost_before: CostSummary
    cost_after: CostSummary
    accuracy_before: float
    accuracy_after: float
    accuracy_pruned_no_finetune: float
    layers: list[LayerRow]
    counting_convention: str
    history: list[dict]


@dataclasses.dataclass
class ReportPaths:
    """Files written by `write_report`; plots lists only the PNGs that had data to draw."""
    markdown: Path
    html: Path
    plots: list[Path]


@dataclasses.dataclass
class _Table:
    headers: list[str]
    rows: list[list[Any]]
    align: str | None = None


@dataclasses.dataclass
class _Image:
    file: str
    alt: str


@dataclasses.dataclass
class _Code:
    text: str


Block = Union[str, _Table, _Image, _Code]  # a str block is a paragraph


def write_report(run_dir: str | Path, result: ReportInput | None = None) -> ReportPaths:
    """Write report.md, report.html and the plots into `run_dir` (created if missing).

    Without `result`, run_dir/result.json is read.
    """
    run_dir = Path(run_dir)
    if result is None:
        result = _load_result(run_dir / "result.json")
        try:  # a hand-edited file: a field of the wrong type is the file's fault, said in one line
            with warnings.catch_warnings():  # matplotlib's warnings about its values come before that line
                warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"matplotlib\.")
                return _write(run_dir, result)
        except (AttributeError, TypeError, KeyError, ValueError, IndexError, OverflowError) as err:
            raise ConfigError(f"{run_dir / 'result.json'} does not have the layout prunekit writes "
                              f"({type(err).__name__}: {str(err)[:200]}); restore it, or run the command "
                              "that made it again") from None
    return _write(run_dir, result)


def _write(run_dir: Path, result: ReportInput) -> ReportPaths:
    if not isinstance(result, dict):
        raise ConfigError(f"the report needs a result dict, got {type(result).__name__}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # everything is drawn and rendered in a scratch folder first: a failure leaves the old report whole
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".report-") as scratch:
        images = _draw_plots(Path(scratch), result)
        title = result.get("title") or f"Pruning report: {result.get('method') or 'unknown method'}"
        sections = _sections(result, images)
        (Path(scratch) / "report.md").write_text(_render_markdown(title, sections), encoding="utf-8")
        (Path(scratch) / "report.html").write_text(_render_html(title, sections), encoding="utf-8")
        for name in ["report.md", "report.html"] + [name for name, _ in images]:
            os.replace(Path(scratch) / name, run_dir / name)
    return ReportPaths(markdown=run_dir / "report.md", html=run_dir / "report.html",
                       plots=[run_dir / name for name, _ in images])


def _load_result(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass the result dict or write result.json first")
    return read_json(path, "result", "rewrite it from the run's result", error=ConfigError)


def _cost(result: dict, side: str, key: str) -> tuple[float | None, bool]:
    """(value, summed_from_layers) for key in cost_<side>, else the sum over layers if all have it."""
    value = (result.get(f"cost_{side}") or {}).get(key)
    if value is not None:
        return float(value), False
    layers = result.get("layers") or []
    values = [row.get(f"{key}_{side}") for row in layers]
    if layers and all(v is not None for v in values):
        return float(sum(values)), True
    return None, False


def _latency_ms(result: dict, side: str) -> float | None:
    latency = (result.get(f"cost_{side}") or {}).get("latency") or {}
    return latency.get("median_ms")


def _draw_plots(run_dir: Path, result: dict) -> list[tuple[str, str]]:
    """Draw the plots that have data; returns (file name, alt text) pairs."""
    (mb, _), (ma, _) = _cost(result, "before", "macs"), _cost(result, "after", "macs")
    history = [(h.get("macs"), h.get("accuracy")) for h in result.get("history") or [] if isinstance(h, dict)]
    drawn = []
    acc = plots.plot_accuracy_vs_macs(run_dir / "accuracy_vs_macs.png", before=(mb, result.get("accuracy_before")),
                                      after=(ma, result.get("accuracy_after")),
                                      no_finetune=(ma, result.get("accuracy_pruned_no_finetune")), history=history)
    if acc is not None:
        drawn.append((acc.name, "accuracy vs MACs"))
    layers = result.get("layers") or []
    widths = plots.plot_layer_widths(run_dir / "layer_widths.png", [str(r.get("name", "?")) for r in layers],
                                     [r.get("channels_before") for r in layers],
                                     [r.get("channels_after") for r in layers])
    if widths is not None:
        drawn.append((widths.name, "channels per layer before and after pruning"))
    return drawn


def _sections(result: dict, images: list[tuple[str, str]]) -> list[tuple[str, list[Block]]]:
    summary: list[Block] = [f"Method: {result.get('method') or NA}"]
    masked = (result.get("sparsity") or {}).get("masked") or {}
    if masked.get("numel"):
        tensors = (result.get("sparsity") or {}).get("tensors") or {}
        kinds = [str(e.get("kind")) for e in tensors.values() if isinstance(e, dict) and e.get("kind")]
        shown = "; ".join(f"{k} on {kinds.count(k)} tensor{'s' if kinds.count(k) > 1 else ''}"
                          for k in sorted(set(kinds)))
        summary.append(f"Weight masks: {fmt_pct(masked.get('sparsity'))} of {fmt_int(masked['numel'])} masked weights "
                       "are zero (counted in the final weights)" + (f"; mask kinds: {shown}" if shown else ""))
    summary.append(_Table(["accuracy", "value"], _accuracy_rows(result), "lr"))
    summary.append(_Table(["total", "before", "after", "after / before", "reduction"], _total_rows(result), "lrrrr"))
    if any(_cost(result, side, k)[1] for side in ("before", "after") for k in ("params", "macs")):
        summary.append("Totals marked * are sums over the listed layers (no whole-model count was given).")
    summary.append(f"Counting convention: {result.get('counting_convention') or 'not recorded'}")
    summary += _pruning_measurements(result.get("prune_metrics") or {})
    sections: list[tuple[str, list[Block]]] = [("Summary", summary)]
    notes = (result.get("prune_metrics") or {}).get("notes")
    if isinstance(notes, list) and notes:  # what the pruner said about its result (shown on the console too)
        sections.append(("Notes from pruning", [str(n) for n in notes]))
    if images:
        sections.append(("Plots", [_Image(name, alt) for name, alt in images]))
    if result.get("layers"):
        sections.append(("Per-layer", [_layer_table(result["layers"])]))
    if result.get("history"):
        sections.append(("History", [_history_table(result["history"])]))
    latency = _latency_table(result)
    if latency is not None:
        sections.append(("Latency measurement", [latency]))
    env = result.get("environment")
    sections.append(("Environment", [_Table(["key", "value"], _flatten(env), "ll")] if env else ["not recorded"]))
    config = result.get("config")
    sections.append(("Config", [_Code(json.dumps(config, indent=2, sort_keys=True, default=str))]
                     if config else ["not recorded"]))
    return sections


def _pruning_measurements(metrics: dict) -> list[Block]:
    """What the pruner itself measured: the latency target it aimed at and the memory format it chose."""
    out: list[Block] = []
    lat = metrics.get("latency")
    if isinstance(lat, dict) and isinstance(lat.get("measured_fraction"), (int, float)):
        how = lat.get("settings") if isinstance(lat.get("settings"), dict) else {}
        timed = ", ".join(f"{k.replace('_', ' ')} {how[k]}" for k in ("device", "dtype", "batch_size", "threads")
                          if how.get(k) is not None)
        layout = {True: "channels-last", False: "contiguous"}.get(how.get("channels_last"))
        timed += (", " if timed else "") + layout if layout else ""
        out.append(f"Latency target: {lat.get('target')} of the model's latency; measured while pruning: "
                   f"{lat['measured_fraction']:.3f} (tolerance {lat.get('tolerance')}"
                   + (f"; timed at {timed}" if timed else "") + ")")
    rounding = metrics.get("rounding")
    if isinstance(rounding, dict) and rounding.get("multiple") not in (None, 1):
        asked = rounding.get("round_to")
        out.append(f"Widths rounded to multiples of {rounding['multiple']}"
                   + (f" (round_to={asked} asked for)" if asked != rounding["multiple"] else "")
                   + "; a group no wider than the multiple steps by a smaller power of two")
    fmt = metrics.get("memory_format")
    if isinstance(fmt, dict) and fmt.get("choice"):
        timed = ""
        if isinstance(fmt.get("contiguous_ms"), (int, float)) and isinstance(fmt.get("channels_last_ms"), (int, float)):
            timed = (f" (timed at batch {fmt.get('batch')}: contiguous {fmt_ms(fmt['contiguous_ms'])} ms, "
                     f"channels-last {fmt_ms(fmt['channels_last_ms'])} ms)")
        out.append(f"Memory format of the pruned model: {str(fmt['choice']).replace('_', '-')}{timed}")
    return out


def _accuracy_rows(result: dict) -> list[list[str]]:
    before, after = result.get("accuracy_before"), result.get("accuracy_after")
    rows = [["before", fmt_accuracy(before)]]
    if result.get("accuracy_pruned_no_finetune") is not None:
        rows.append(["pruned, no fine-tune", fmt_accuracy(result["accuracy_pruned_no_finetune"])])
    rows += [["after", fmt_accuracy(after)], ["delta (after - before)", fmt_delta_pp(before, after)]]
    return rows


def _total_rows(result: dict) -> list[list[str]]:
    rows = []
    for key, label in (("params", "params"), ("macs", "MACs")):
        (b, b_sum), (a, a_sum) = _cost(result, "before", key), _cost(result, "after", key)
        ratio = fmt_pct(a / b) if a is not None and b else NA
        rows.append([label, _total_text(b, b_sum), _total_text(a, a_sum), ratio,
                     fmt_reduction(b, a, f"fewer {label}", f"more {label}")])
    b, a = _latency_ms(result, "before"), _latency_ms(result, "after")
    if b is not None or a is not None:
        ratio = fmt_pct(a / b) if a is not None and b else NA
        rows.append(["latency, median (ms)", fmt_ms(b), fmt_ms(a), ratio, _latency_change(result, b, a)])
    return rows


def _latency_change(result: dict, before: float | None, after: float | None) -> str:
    """"1.50x faster", or "no measurable change" when the interleaved rounds do not show one."""
    from ..cost.latency_results import paired_change

    times = [((result.get(f"cost_{side}") or {}).get("latency") or {}).get("times_ms") or [] for side in ("before", "after")]
    change = paired_change(*times)
    if change["measured"] is False:
        return f"no measurable change (faster in {change['faster_rounds']} of {change['rounds']} interleaved rounds)"
    return fmt_reduction(before, after, "faster", "slower")


def _total_text(value: float | None, summed: bool) -> str:
    if value is None:
        return NA
    return f"{fmt_count(value)} ({fmt_int(value)}){' *' if summed else ''}"


def _layer_table(layers: list[dict]) -> _Table:
    with_latency = any(r.get("latency_ms_before") is not None or r.get("latency_ms_after") is not None
                       for r in layers)
    headers = ["layer", "channels before", "channels after", "kept", "params before", "params after",
               "MACs before", "MACs after"]
    if with_latency:
        headers += ["latency before (ms)", "latency after (ms)"]
    rows = []
    for r in layers:
        cb, ca = r.get("channels_before"), r.get("channels_after")
        row = [str(r.get("name", "?")), _int_or_na(cb), _int_or_na(ca),
               fmt_pct(ca / cb) if cb and ca is not None else NA,
               fmt_count(r.get("params_before")), fmt_count(r.get("params_after")),
               fmt_count(r.get("macs_before")), fmt_count(r.get("macs_after"))]
        if with_latency:
            row += [fmt_ms(r.get("latency_ms_before")), fmt_ms(r.get("latency_ms_after"))]
        rows.append(row)
    return _Table(headers, rows, "l" + "r" * (len(headers) - 1))


def _int_or_na(x: Any) -> str:
    return NA if x is None else str(int(x))


def _history_table(history: list[Any]) -> _Table:
    entries = [h for h in history if isinstance(h, dict)]
    keys: list[str] = []
    for h in entries:
        keys += [k for k in h if k not in keys]
    fmt = {"macs": fmt_count, "params": fmt_count, "accuracy": fmt_accuracy, "val_accuracy": fmt_accuracy,
           "latency_ms": fmt_ms}
    rows = [[fmt.get(k, lambda v: NA if v is None else v)(h.get(k)) for k in keys] for h in entries]
    return _Table(keys, rows)


def _latency_table(result: dict) -> _Table | None:
    lat = {side: (result.get(f"cost_{side}") or {}).get("latency") for side in ("before", "after")}
    if not any(lat.values()):
        return None
    fields = [("median (ms)", "median_ms", fmt_ms), ("p10 (ms)", "p10_ms", fmt_ms), ("p90 (ms)", "p90_ms", fmt_ms),
              ("mean (ms)", "mean_ms", fmt_ms), ("std (ms)", "std_ms", fmt_ms), ("repeats", "n", str),
              ("device", "device_name", str), ("dtype", "dtype", str), ("batch", "batch", str),
              ("torch", "torch_version", str)]
    rows = []
    for label, key, fmt in fields:
        cells = [(lat[s] or {}).get(key) for s in ("before", "after")]
        rows.append([label] + [NA if c is None else fmt(c) for c in cells])
    layouts = [((lat[s] or {}).get("settings") or {}).get("channels_last") for s in ("before", "after")]
    rows.append(["memory format"] + [NA if c is None else "channels-last" if c else "contiguous" for c in layouts])
    return _Table(["", "before", "after"], rows, "lrr")


def _flatten(data: Any, prefix: str = "") -> list[list[str]]:
    """Nested dicts as dotted key / value rows: {"cuda": {"name": x}} -> ["cuda.name", x]."""
    if not isinstance(data, dict):
        return [[prefix or "value", NA if data is None else str(data)]]
    rows = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        rows += _flatten(value, name) if isinstance(value, dict) and value else [[name, NA if value is None else str(value)]]
    return rows


def _render_markdown(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    out = [f"# {md_escape(title)}", ""]
    for name, blocks in sections:
        out += [f"## {name}", ""]
        for b in blocks:
            if isinstance(b, _Table):
                out.append(markdown_table(b.headers, b.rows, b.align))
            elif isinstance(b, _Image):
                out.append(f"![{b.alt}]({b.file})")
            elif isinstance(b, _Code):
                fence = "````" if "```" in b.text else "```"
                out += [fence + "json", b.text, fence]
            else:
                out.append(md_escape(b))
            out.append("")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1em}th,td{border:1px solid #ccc;padding:0.25em 0.6em}"
        "th{background:#f2f2f2}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}"
        "pre{background:#f7f7f7;padding:0.8em;overflow-x:auto}img{max-width:100%}")


def _render_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{html.escape(title)}</h1>"]
    for name, blocks in sections:
        out.append(f"<h2>{html.escape(name)}</h2>")
        for b in blocks:
            if isinstance(b, _Table):
                out.append(html_table(b.headers, b.rows, b.align))
            elif isinstance(b, _Image):
                out.append(f'<p><img src="{html.escape(b.file)}" alt="{html.escape(b.alt)}"></p>')
            elif isinstance(b, _Code):
                out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
            else:
                out.append(f"<p>{html.escape(b)}</p>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
