"""Steering methods. Each returns an :class:`~tl_steer.interventions.Intervention`."""

from tl_steer.methods.diffmean import diffmean
from tl_steer.methods.split import sft, split

__all__ = ["diffmean", "sft", "split"]
