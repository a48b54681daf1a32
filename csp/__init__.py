"""LVLM_CSP and the token-reduction baselines: the method registry (csp.methods), the stage runner
that executes a method's per-layer token plan (csp.runner), CSP's schedule and clustering
strategies, and the efficiency accounting."""

from csp.schedule import ScheduleError, StageSchedule

__all__ = ["ScheduleError", "StageSchedule"]
