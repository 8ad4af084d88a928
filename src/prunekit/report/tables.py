"""Number formatting and table rendering shared by the Markdown and HTML reports.

Cells are formatted once with the `fmt_*` helpers and rendered by `markdown_table` or
`html_table`, so both reports show the same text. Every cell is escaped for its target
(HTML entities; Markdown pipes and markup characters), because layer names come from user models.

>>> fmt_count(1_234_567), fmt_count(4.1e9), fmt_count(950)
('1.23M', '4.1G', '950')
>>> print(markdown_table(["layer", "MACs"], [["conv|1", fmt_count(2e6)]]))
| layer | MACs |
| --- | --- |
| conv\\|1 | 2M |
"""
from __future__ import annotations

import html
import math
from typing import Any, Sequence

from ..core.errors import ConfigError

NA = "n/a"
_SUFFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
_MD_SPECIAL = "\\|<>*`[]&"


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_count(x: float | None, digits: int = 3) -> str:
    """Compact count with K/M/G/T/P suffix and `digits` significant digits.

    >>> fmt_count(999_999), fmt_count(-2500), fmt_count(12.5), fmt_count(None)
    ('1M', '-2.5K', '12.5', 'n/a')
    """
    if _missing(x):
        return NA
    x = float(x)
    if abs(x) < 1000:
        return str(int(x)) if x == int(x) else f"{x:.{digits}g}"
    i = next(k for k, (scale, _) in enumerate(_SUFFIXES) if abs(x) >= scale)
    text = f"{x / _SUFFIXES[i][0]:.{digits}g}"
    # 999_999 at 3 digits rounds to "1e+03"K; say "1M" instead.
    if abs(float(text)) >= 1000 and i > 0:
        i -= 1
        text = f"{x / _SUFFIXES[i][0]:.{digits}g}"
    return f"{text}{_SUFFIXES[i][1]}"


def fmt_int(x: float | None) -> str:
    """Exact integer with thousands separators: 1,234,567."""
    return NA if _missing(x) else f"{int(round(float(x))):,}"


def fmt_ms(x: float | None) -> str:
    """Milliseconds with precision that fits the magnitude: 123, 12.3, 1.23, 0.123, 0.0123.

    >>> fmt_ms(0.01234), fmt_ms(5.0), fmt_ms(250.4), fmt_ms(0.5)
    ('0.0123', '5.00', '250', '0.500')
    """
    if _missing(x):
        return NA
    x = float(x)
    if abs(x) < 1:
        return f"{x:#.3g}"  # '#' keeps trailing zeros so 0.5 prints as 0.500, like 5.00
    decimals = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:.{decimals}f}"


def fmt_pct(fraction: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: 0.25 -> "25.0%"."""
    return NA if _missing(fraction) else f"{100.0 * float(fraction):.{digits}f}%"


def as_fraction(accuracy: float | None) -> float | None:
    """Accuracy as a fraction in [0, 1]; values above 1 are taken to be percentages already."""
    if _missing(accuracy):
        return None
    a = float(accuracy)
    return a / 100.0 if a > 1.0 else a


def fmt_accuracy(accuracy: float | None) -> str:
    """Accuracy as a percentage with two decimals (fraction or percent input).

    >>> fmt_accuracy(0.9312), fmt_accuracy(93.12)
    ('93.12%', '93.12%')
    """
    return fmt_pct(as_fraction(accuracy), digits=2)


def fmt_delta_pp(before: float | None, after: float | None) -> str:
    """Signed accuracy change in percentage points: "-1.07 pp"."""
    b, a = as_fraction(before), as_fraction(after)
    if b is None or a is None:
        return NA
    return f"{100.0 * (a - b):+.2f} pp"


def fmt_reduction(before: float | None, after: float | None, fewer: str = "fewer", more: str = "more") -> str:
    """How many times smaller `after` is: (400, 100) -> "4.00x fewer"; growth says "more".

    >>> fmt_reduction(400, 100), fmt_reduction(100, 125), fmt_reduction(10, 0)
    ('4.00x fewer', '1.25x more', 'all removed')
    """
    if _missing(before) or _missing(after) or float(before) <= 0:
        return NA
    b, a = float(before), float(after)
    if a <= 0:
        return "all removed"
    return f"{b / a:.2f}x {fewer}" if a <= b else f"{a / b:.2f}x {more}"


def fmt_cell(x: Any) -> str:
    """Default text for a cell: strings as is, floats with 4 significant digits, None as n/a."""
    if _missing(x):
        return NA
    if isinstance(x, bool) or isinstance(x, str):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _check_align(align: str | None, headers: Sequence[Any]) -> str:
    align = align or "l" * len(headers)
    if len(align) != len(headers) or set(align) - set("lrc"):
        raise ConfigError(f"align={align!r} must give one of l, r, c per column ({len(headers)} columns)")
    return align


def md_escape(text: str) -> str:
    """Backslash-escape Markdown table/markup characters (links, entities, emphasis; an underscore
    only where it could emphasise) and fold newlines into spaces."""
    text = " ".join(text.splitlines())  # a newline would end the table row
    return "".join("\\" + ch if ch in _MD_SPECIAL or (ch == "_" and not _inside_word(text, i)) else ch
                   for i, ch in enumerate(text))


def _inside_word(text: str, i: int) -> bool:
    """Whether text[i] sits between two letters or digits (an underscore there never emphasises)."""
    return 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; `align` is one letter per column: l, r or c.

    >>> print(markdown_table(["a", "b"], [[1, None]], align="lr"))
    | a | b |
    | :-- | --: |
    | 1 | n/a |
    """
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    rule = [marks[a] for a in _check_align(align, headers)] if align else ["---"] * len(headers)
    lines = ["| " + " | ".join(md_escape(fmt_cell(h)) for h in headers) + " |",
             "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(md_escape(fmt_cell(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], align: str | None = None,
               caption: str | None = None) -> str:
    """An HTML <table> with every header and cell escaped.

    >>> html_table(["name"], [["<b>"]])
    '<table>\\n<thead><tr><th>name</th></tr></thead>\\n<tbody>\\n<tr><td>&lt;b&gt;</td></tr>\\n</tbody>\\n</table>'
    """
    styles = {"l": "", "r": ' class="num"', "c": ' class="mid"'}
    attrs = [styles[a] for a in _check_align(align, headers)]
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th{a}>{html.escape(fmt_cell(h))}</th>"
                                         for a, h in zip(attrs, headers)) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td{a}>{html.escape(fmt_cell(c))}</td>"
                                      for a, c in zip(attrs, row)) + "</tr>")
    parts.append("</tbody>")
    parts.append("</table>")
    return "\n".join(parts)
