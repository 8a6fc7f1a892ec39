"""Data: contrastive pairs and the built-in datasets."""

from tl_steer.data.pairs import ContrastivePair, builtin_concepts, check_pairs, load_pairs, read_pairs

__all__ = ["ContrastivePair", "builtin_concepts", "check_pairs", "load_pairs", "read_pairs"]
