"""LVLM_CSP: the clustering / scattering / pruning image-token schedule and its accounting."""

from csp.schedule import ScheduleError, StageSchedule

__all__ = ["ScheduleError", "StageSchedule"]
