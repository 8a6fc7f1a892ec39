"""Steering methods. Each returns an :class:`~tl_steer.interventions.Intervention`."""

from tl_steer.methods.diffmean import diffmean

__all__ = ["diffmean"]
