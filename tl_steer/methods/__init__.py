"""Steering methods. Each returns an :class:`~tl_steer.interventions.Intervention`."""

from tl_steer.methods.cold import ColdFD, cold_fd, cold_kernel
from tl_steer.methods.diffmean import diffmean
from tl_steer.methods.sae import SAEFeatureEdit, rank_features, sae_feature
from tl_steer.methods.split import sft, split

__all__ = [
    "ColdFD",
    "SAEFeatureEdit",
    "cold_fd",
    "cold_kernel",
    "diffmean",
    "rank_features",
    "sae_feature",
    "sft",
    "split",
]
