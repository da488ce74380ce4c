"""Reports of a study folder: tables, warnings and figures rebuilt from its records alone.

This package imports no training code and no torch: only the standard library, numpy and scipy for
the statistics (``histossl.stats``), matplotlib's Agg canvas and yaml, so ``histossl report`` runs anywhere.

Public API:
    build_report(out_dir) -> Path: write report.md, report.html and figures/; return report.md's path.
    load_records(out_dir) -> list[dict]: the results.jsonl records (read by histossl.records), corrupt lines skipped with a warning.
    aggregate(records) -> Aggregate: records grouped into table cells (CellKey: protocol, schedule, budget, encoder).
    find_flags(records, stages) -> list[Flag]: collapsed runs, pretext tasks at chance, identical results.
    verdict.compare(records) -> list[Comparison]: paired comparisons by seed, Holm-corrected (the verdict).
    compare.compare_studies(dir_a, dir_b) -> str: two studies on the same split, cell by cell (markdown).
"""

from histossl.report.build import build_report, compose
from histossl.report.flags import Flag, find_flags
from histossl.report.records import Stage, load_records, load_stages, read_records
from histossl.report.tables import Aggregate, aggregate, format_loss_accuracy, format_summary, summarize

__all__ = [
    "Aggregate",
    "Flag",
    "Stage",
    "aggregate",
    "build_report",
    "compose",
    "find_flags",
    "format_loss_accuracy",
    "format_summary",
    "load_records",
    "load_stages",
    "read_records",
    "summarize",
]
