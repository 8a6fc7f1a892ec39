"""``tl-steer report``: the whole comparison on one concept, written as HTML, PNG, CSV and JSON."""

from tl_steer.report.grid import BuiltinData, GridResult, grid_cells, run_grid
from tl_steer.report.pipeline import METHODS, ReportData, ReportResult, ReportSettings, run_report

__all__ = [
    "METHODS",
    "BuiltinData",
    "GridResult",
    "ReportData",
    "ReportResult",
    "ReportSettings",
    "grid_cells",
    "run_grid",
    "run_report",
]
