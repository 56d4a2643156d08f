"""The import path the README has documented for the zigzag permutation; it lives in zigzag.py."""

from .zigzag import zigzag_merge, zigzag_positions, zigzag_split

__all__ = ["zigzag_merge", "zigzag_positions", "zigzag_split"]
