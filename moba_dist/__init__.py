"""moba-dist: context-parallel Mixture of Block Attention (MoBA) for PyTorch."""

from .moba import moba_attn_varlen
from .parallel.api import moba_attn_varlen_cp
from .stats import MoBAStats, last_stats

__version__ = "0.1.0"

__all__ = ["moba_attn_varlen", "moba_attn_varlen_cp", "MoBAStats", "last_stats", "__version__"]
