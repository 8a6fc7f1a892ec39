"""Data: contrastive pairs and the built-in datasets."""

from tl_steer.data.ab import ABItem, ab_behaviors, ab_behaviours, load_ab_items, read_ab_items
from tl_steer.data.mc import MCItem, check_mc_items, load_mc_items, mc_item, mc_sets, read_mc_items
from tl_steer.data.pairs import ContrastivePair, builtin_concepts, check_pairs, load_pairs, read_pairs

__all__ = [
    "ABItem",
    "ab_behaviors",
    "ab_behaviours",
    "load_ab_items",
    "read_ab_items",
    "MCItem",
    "check_mc_items",
    "load_mc_items",
    "mc_item",
    "mc_sets",
    "read_mc_items",
    "ContrastivePair",
    "builtin_concepts",
    "check_pairs",
    "load_pairs",
    "read_pairs",
]
