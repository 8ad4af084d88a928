"""Number formatting and Markdown/HTML table rendering."""
from __future__ import annotations

import pytest

from prunekit.core.errors import ConfigError
from prunekit.report.tables import (fmt_accuracy, fmt_count, fmt_delta_pp, fmt_int, fmt_ms, fmt_pct,
                                    fmt_reduction, html_table, markdown_table, md_escape)


@pytest.mark.parametrize("value, text", [
    (0, "0"), (999, "999"), (12.5, "12.5"), (1000, "1K"), (1_234_567, "1.23M"), (4.1e9, "4.1G"),
    (999_999, "1M"), (999_499, "999K"), (-2500, "-2.5K"), (7.25e12, "7.25T"), (None, "n/a"),
    (float("nan"), "n/a"),
])
def test_fmt_count(value, text):
    assert fmt_count(value) == text


def test_other_formatters():
    assert fmt_int(1234567.4) == "1,234,567"
    assert (fmt_ms(0.01234), fmt_ms(1.234), fmt_ms(12.34), fmt_ms(123.4)) == ("0.0123", "1.23", "12.3", "123")
    assert fmt_pct(0.3333) == "33.3%"
    assert fmt_accuracy(0.9) == fmt_accuracy(90.0) == "90.00%"
    assert fmt_delta_pp(0.9312, 0.9205) == "-1.07 pp" and fmt_delta_pp(90, 0.91) == "+1.00 pp"
    assert fmt_delta_pp(None, 0.5) == "n/a"
    assert fmt_reduction(557.9, 123.4) == "4.52x fewer" and fmt_reduction(2.0, 0.8, "faster") == "2.50x faster"
    assert fmt_reduction(0.8, 2.0, "faster", "slower") == "2.50x slower"
    assert fmt_reduction(0, 5) == "n/a" and fmt_reduction(None, 5) == "n/a"


def test_markdown_table_escapes_and_aligns():
    text = markdown_table(["name", "n"], [["a|b<c>*", 3], ["two\nlines", None]], align="lr")
    assert text.splitlines() == [
        "| name | n |",
        "| :-- | --: |",
        "| a\\|b\\<c\\>\\* | 3 |",
        "| two lines | n/a |",
    ]


def test_markdown_escape_stops_links_entities_and_emphasis_but_keeps_names_readable():
    assert md_escape("[x](http://a) &lt; _em_ seed_l2") == "\\[x\\](http://a) \\&lt; \\_em\\_ seed_l2"


def test_html_table_escapes_every_cell_and_header():
    text = html_table(["<th>", "v"], [['"x" & <y>', 1.5]], align="lr", caption="a<b")
    assert "<caption>a&lt;b</caption>" in text
    assert "<th>&lt;th&gt;</th>" in text
    assert '<td>&quot;x&quot; &amp; &lt;y&gt;</td><td class="num">1.5</td>' in text


def test_align_must_fit_the_columns():
    with pytest.raises(ConfigError, match="align"):
        markdown_table(["a", "b"], [], align="l")
    with pytest.raises(ConfigError, match="align"):
        html_table(["a"], [], align="x")
