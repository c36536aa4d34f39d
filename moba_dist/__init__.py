"""moba-dist: context-parallel Mixture of Block Attention (MoBA) for PyTorch."""

from .config import MoBAConfig
from .decode import moba_decode
from .moba import moba_attn_varlen
from .module import MoBAAttention
from .parallel.api import moba_attn_varlen_cp, ring_attn_varlen_cp
from .parallel.step import StepPlan
from .settings import Settings
from .stats import MoBAStats, last_stats

__version__ = "0.1.0"

__all__ = [
    "MoBAAttention",
    "MoBAConfig",
    "MoBAStats",
    "Settings",
    "StepPlan",
    "__version__",
    "last_stats",
    "moba_attn_varlen",
    "moba_attn_varlen_cp",
    "moba_decode",
    "ring_attn_varlen_cp",
]
