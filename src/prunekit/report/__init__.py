"""Run reports: report.md, report.html and PNG plots from a run's result dict.

>>> from prunekit.report import write_report
>>> import tempfile
>>> paths = write_report(tempfile.mkdtemp(), {"method": "l1", "accuracy_before": 0.9, "accuracy_after": 0.89})
>>> paths.html.name
'report.html'
"""
from .tables import fmt_count, html_table, markdown_table
from .writer import CostSummary, LayerRow, ReportInput, ReportPaths, write_report

__all__ = ["CostSummary", "LayerRow", "ReportInput", "ReportPaths", "write_report",
           "fmt_count", "html_table", "markdown_table"]
