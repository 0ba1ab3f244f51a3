"""Resource-aware assignment of devices to several federated tasks (US20220391780A1).

Each round, for every task, a policy picks target devices among the available candidates
from their resource information (the patent's claim 1: "determining, for a current learning
period, a target device for each task ... according to a plurality of resource information").
Both policies here see the same :class:`RoundRequest` and return the same number of devices
per task (``min(wanted, what the eligible devices allow)``):

* :class:`ResourceScheduler` ranks devices by ``log(relative slowness) - fairness_weight *
  participation deficit`` (slowness: the geometric mean over tasks of the device's time over
  the task's median time; deficit: the population's mean participation count minus the
  device's), keeps the best ``sum(wanted)``, then lets each task in turn (the order rotates
  by round) take its fastest devices among them. Slow devices are held back until their
  deficit outweighs their slowness; by then other slow devices are overdue too, so they meet
  in the same few task-rounds instead of slowing every task-round down, which is where the
  time goes: a task's round lasts as long as its slowest device.
* :class:`RandomAssigner`: the baseline, uniformly random eligible devices per task.

A device is *eligible* for a task when it is available this round, its remaining privacy
budget for the task can pay one more participation, and its time for the task is within the
configured limit; a device trains at most one task per round. :func:`check_assignment`
enforces this on every assignment (fail closed), whichever policy made it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from secfl.errors import SecflError
from secfl.randomness import RandomStream


class SchedulingError(SecflError):
    """An assignment broke a scheduling invariant (ineligible or doubly assigned device)."""


def jain_index(allocations: Sequence[float] | np.ndarray) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all are equal, 1/n when one
    device has everything. All zeros (nobody served yet) counts as equal: 1."""
    x = np.asarray(allocations, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise SchedulingError(f"jain_index needs a non-empty vector, got shape {x.shape}")
    if np.any(x < 0) or not np.all(np.isfinite(x)):
        raise SchedulingError("jain_index needs finite allocations >= 0")
    squares = float(np.dot(x, x))
    if squares == 0.0:
        return 1.0
    return float(x.sum() ** 2 / (x.size * squares))


@dataclass(frozen=True, eq=False)
class RoundRequest:
    """What a policy decides from in one round.

    ``times[d, t]``: simulated seconds device d needs for task t; ``eligible[d, t]``: d may
    train t this round; ``wanted[t]``: devices task t asks for; ``participation[d]``: rounds
    device d has trained so far (any task).
    """

    round: int
    times: np.ndarray
    eligible: np.ndarray
    wanted: np.ndarray
    participation: np.ndarray

    def __post_init__(self) -> None:
        n, t = self.times.shape
        if self.eligible.shape != (n, t) or self.eligible.dtype != np.bool_:
            raise SchedulingError(f"eligible must be a bool array of shape {(n, t)}")
        if self.wanted.shape != (t,) or np.any(self.wanted < 0):
            raise SchedulingError(f"wanted must be {t} counts >= 0, got {self.wanted}")
        if self.participation.shape != (n,):
            raise SchedulingError(f"participation must have shape {(n,)}")
        if not np.all(self.times > 0):
            raise SchedulingError("device times must be > 0")

    @property
    def devices(self) -> int:
        return int(self.times.shape[0])

    @property
    def tasks(self) -> int:
        return int(self.times.shape[1])


#: Per task, the sorted ids of the devices assigned to it.
Assignment = tuple[tuple[int, ...], ...]


class AssignmentPolicy(Protocol):
    name: str

    def assign(self, request: RoundRequest, stream: RandomStream) -> Assignment: ...


def check_assignment(request: RoundRequest, assignment: Assignment) -> None:
    """Raise :class:`SchedulingError` unless every assigned device is eligible for its task,
    no device has two tasks and no task gets more than it wanted."""
    if len(assignment) != request.tasks:
        raise SchedulingError(f"{len(assignment)} task cohorts for {request.tasks} tasks")
    seen: set[int] = set()
    for t, devices in enumerate(assignment):
        if len(devices) > request.wanted[t]:
            raise SchedulingError(f"task {t}: {len(devices)} devices, wanted {request.wanted[t]}")
        for d in devices:
            if not 0 <= d < request.devices:
                raise SchedulingError(f"task {t}: unknown device {d}")
            if not request.eligible[d, t]:
                raise SchedulingError(
                    f"task {t}: device {d} is not eligible (unavailable, out of privacy "
                    "budget or over its time limit)"
                )
            if d in seen:
                raise SchedulingError(f"device {d} is assigned to two tasks in one round")
            seen.add(d)


def task_round_times(request: RoundRequest, assignment: Assignment) -> np.ndarray:
    """Per task, the round's simulated time: the slowest assigned device (0 if none)."""
    return np.array(
        [
            float(request.times[list(devices), t].max()) if devices else 0.0
            for t, devices in enumerate(assignment)
        ]
    )


class RandomAssigner:
    """The baseline: each task (in a random order) draws its devices uniformly among the
    eligible devices not yet taken this round."""

    name = "random"

    def assign(self, request: RoundRequest, stream: RandomStream) -> Assignment:
        taken = np.zeros(request.devices, dtype=bool)
        out: list[tuple[int, ...]] = [() for _ in range(request.tasks)]
        for t in stream.permutation(request.tasks):
            candidates = np.flatnonzero(request.eligible[:, t] & ~taken)
            k = min(int(request.wanted[t]), candidates.size)
            chosen = candidates[stream.permutation(candidates.size)[:k]]
            taken[chosen] = True
            out[int(t)] = tuple(sorted(int(d) for d in chosen))
        return tuple(out)


class ResourceScheduler:
    """Fast devices first, slow ones grouped together once they are due (module docstring).

    ``fairness_weight`` trades time for fairness: 0 always prefers the fastest devices
    (unfair); larger values approach round-robin. Deterministic: ties go to the lower id.
    """

    name = "resource"

    def __init__(self, *, fairness_weight: float) -> None:
        if not fairness_weight >= 0:
            raise SchedulingError(f"fairness_weight must be >= 0, got {fairness_weight}")
        self.fairness_weight = fairness_weight

    def ranking(self, request: RoundRequest) -> np.ndarray:
        """Devices eligible for some task, best first."""
        times = request.times
        relative = np.log(times / np.median(times, axis=0, keepdims=True))
        slowness = relative.mean(axis=1)
        deficit = request.participation.mean() - request.participation
        score = slowness - self.fairness_weight * deficit
        usable = np.flatnonzero(request.eligible.any(axis=1))
        return usable[np.lexsort((usable, score[usable]))]

    def assign(self, request: RoundRequest, stream: RandomStream) -> Assignment:
        del stream  # deterministic policy
        order = self.ranking(request)
        budget = int(request.wanted.sum())
        pool = list(order[:budget])
        reserve = list(order[budget:])
        taken = np.zeros(request.devices, dtype=bool)
        out: list[tuple[int, ...]] = [() for _ in range(request.tasks)]
        first = request.round % request.tasks if request.tasks else 0
        for t in [(first + i) % request.tasks for i in range(request.tasks)]:
            want = int(request.wanted[t])
            candidates = [d for d in pool if request.eligible[d, t] and not taken[d]]
            while len(candidates) < want and reserve:
                # the pool cannot serve this task (budgets, time limits): next in rank
                d = reserve.pop(0)
                pool.append(d)
                if request.eligible[d, t] and not taken[d]:
                    candidates.append(d)
            ids = np.asarray(candidates, dtype=np.int64)
            best = ids[np.lexsort((ids, request.times[ids, t]))[:want]] if ids.size else ids
            taken[best] = True
            out[t] = tuple(sorted(int(d) for d in best))
        return tuple(out)


def make_policy(kind: str, *, fairness_weight: float) -> AssignmentPolicy:
    if kind == "resource":
        return ResourceScheduler(fairness_weight=fairness_weight)
    if kind == "random":
        return RandomAssigner()
    raise SchedulingError(f"unknown scheduling policy {kind!r}; allowed: resource, random")
