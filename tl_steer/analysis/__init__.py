"""Analyses of what steering buys and costs."""

from tl_steer.analysis.stats import bootstrap_ci

__all__ = ["bootstrap_ci"]
