"""Context-parallel machinery: planning (pure), collectives, and the CP entry points."""

from .comm import Comm
from .plan import FetchPlan, LocalPlan, expand_ranges, fetch_plan, local_plan

__all__ = ["Comm", "FetchPlan", "LocalPlan", "expand_ranges", "fetch_plan", "local_plan"]
