"""Analysis of lbs-tune sweeps: experiment folders -> Arrow tables -> figures -> an HTML report."""

from analysis.load import Results, export, load

__all__ = ["Results", "export", "load"]
