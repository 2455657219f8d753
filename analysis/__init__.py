"""Analysis of lbs-tune sweeps: experiment folders -> Arrow tables -> figures -> an HTML report."""

from analysis.load import export, load
from analysis.tables import Results

__all__ = ["Results", "export", "load"]
