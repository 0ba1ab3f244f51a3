"""Orchestration strategies of the round loop (``server.strategy``, DESIGN 2 step 1).

* ``scheduler`` — resource-aware assignment of devices to several tasks (US20220391780A1):
  :mod:`secfl.strategies.devices` (simulated population, task workloads),
  :mod:`secfl.strategies.scheduler` (policies, invariants, Jain's index),
  :mod:`secfl.strategies.multitask` (the tasks' federations and the run loop).
"""

from secfl.strategies.devices import DevicePopulation, TaskWorkload, workload_of
from secfl.strategies.scheduler import (
    RandomAssigner,
    ResourceScheduler,
    RoundRequest,
    SchedulingError,
    check_assignment,
    jain_index,
    task_round_times,
)

__all__ = [
    "DevicePopulation",
    "RandomAssigner",
    "ResourceScheduler",
    "RoundRequest",
    "SchedulingError",
    "TaskWorkload",
    "check_assignment",
    "jain_index",
    "task_round_times",
    "workload_of",
]
