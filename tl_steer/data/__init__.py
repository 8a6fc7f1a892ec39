"""Data: contrastive pairs and the built-in datasets."""

from tl_steer.data.ab import ABItem, ab_behaviours, load_ab_items, read_ab_items
from tl_steer.data.pairs import ContrastivePair, builtin_concepts, check_pairs, load_pairs, read_pairs

__all__ = [
    "ABItem",
    "ab_behaviours",
    "load_ab_items",
    "read_ab_items",
    "ContrastivePair",
    "builtin_concepts",
    "check_pairs",
    "load_pairs",
    "read_pairs",
]
