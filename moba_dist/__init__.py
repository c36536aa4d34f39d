"""moba-dist: context-parallel Mixture of Block Attention (MoBA) for PyTorch."""

from .moba import moba_attn_varlen
from .stats import MoBAStats, last_stats

__version__ = "0.1.0"

__all__ = ["moba_attn_varlen", "MoBAStats", "last_stats", "__version__"]
