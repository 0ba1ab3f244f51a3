"""What the trust-per-cohort tests of the three strategies (pool, scheduler, tiers) share:
reading the run's logs, recording every federation's replies and round outcomes, the
checks of one federation's defended round, and the comparison of a resumed run."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import secfl.strategies.multitask as multitask
from secfl.audit.events import read_events
from secfl.messages import FitRes
from secfl.server.aggregate import WeightedSum
from secfl.server.loop import RoundOutcome
from secfl.server.protection import AggregateResult
from secfl.wire import decode_message

#: replies[federation][(round, client)]: the client's decoded reply
Replies = dict[str, dict[tuple[int, int], FitRes]]
#: outcomes[federation]: its round outcomes, in order
Outcomes = dict[str, list[RoundOutcome]]


def events_of(folder: Path, *kinds: str) -> list[dict[str, Any]]:
    """The events of ``kinds`` in ``folder/events.jsonl``."""
    return [e for e in read_events(folder / "events.jsonl") if e["event"] in kinds]


def attackers_of(folder: Path) -> set[int]:
    """The malicious clients ``folder``'s log names (its first ``adversary_selected``)."""
    return {int(c) for c in events_of(folder, "adversary_selected")[0]["clients"]}


def dealt(folder: Path, event: str, key: str) -> dict[tuple[int, str], list[int]]:
    """(round, federation) -> the clients the strategy dealt it, from each ``event``'s
    ``key`` (federation -> clients)."""
    return {
        (e["round"], name): clients
        for e in events_of(folder, event)
        for name, clients in e[key].items()
    }


class UpdateRecorder:
    """Passes a federation's exchanges through and keeps every client's decoded reply."""

    def __init__(self, inner: Any, seen: dict[tuple[int, int], FitRes]) -> None:
        self.inner, self.seen = inner, seen

    def exchange(self, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        replies = self.inner.exchange(requests)
        for client_id, reply in replies.items():
            if reply is not None:
                res = decode_message(reply)
                assert isinstance(res, FitRes)
                self.seen[(res.round, client_id)] = res
        return replies


def record_rounds(monkeypatch: pytest.MonkeyPatch) -> tuple[Replies, Outcomes]:
    """Makes every federation a strategy builds (``multitask.build_task``, which pool,
    scheduler and tiers all build theirs with) record its clients' replies and its round
    outcomes, into the two returned tables (filled as the run goes)."""
    replies: Replies = {}
    outcomes: Outcomes = {}
    original = multitask.build_task

    def recording(*args: Any, **kw: Any) -> Any:
        task = original(*args, **kw)
        seen = replies.setdefault(task.name, {})
        task.server.transport = UpdateRecorder(task.server.transport, seen)
        run_round, kept = task.server.run_round, outcomes.setdefault(task.name, [])

        def keep(*a: Any, **k: Any) -> Any:
            outcome = run_round(*a, **k)
            kept.append(outcome)
            return outcome

        task.server.run_round = keep
        return task

    monkeypatch.setattr(multitask, "build_task", recording)
    return replies, outcomes


def mean_of(
    seen: Mapping[tuple[int, int], FitRes], round_index: int, clients: Iterable[int], size: int
) -> np.ndarray:
    """The weighted mean (by sample count) of ``clients``' updates in ``round_index``."""
    total = WeightedSum(size)
    for c in clients:
        res = seen[(round_index, c)]
        total.add(c, res.update, float(res.num_samples))
    return total.weighted_mean()


def check_defended_round(
    outcome: RoundOutcome,
    cohort: Sequence[int],
    folder: Path,
    attackers: set[int],
    seen: Mapping[tuple[int, int], FitRes],
    *,
    flags_change_the_mean: bool = True,
) -> tuple[AggregateResult, set[int]]:
    """One federation's round over ``cohort`` (its log in ``folder``): exactly the
    attackers in it were flagged, every other member survived, and the released mean is
    exactly the weighted mean of the survivors' updates (``flags_change_the_mean``: and,
    when some were flagged, not close to everyone's mean). Returns the aggregate and the
    flagged clients."""
    flagged = {e["client"] for e in events_of(folder, "trust_flag") if e["round"] == outcome.round}
    # the attackers dealt to this federation are flagged in its log, nobody else is
    assert flagged == attackers & set(cohort)
    agg = outcome.aggregate
    assert agg is not None
    assert set(agg.survivors) == set(cohort) - flagged
    # the released mean is exactly the weighted mean of the kept clients' updates
    size = agg.mean_update.size
    assert np.array_equal(agg.mean_update, mean_of(seen, outcome.round, agg.survivors, size))
    if flagged and flags_change_the_mean:
        everyone = mean_of(seen, outcome.round, cohort, size)
        assert not np.allclose(agg.mean_update, everyone)
    return agg, flagged


def check_federation_rounds(
    out: Path,
    name: str,
    rounds: Sequence[RoundOutcome],
    cohorts: Mapping[tuple[int, str], list[int]],
    attackers: set[int],
    seen: Mapping[tuple[int, int], FitRes],
) -> list[tuple[AggregateResult, set[int]]]:
    """Federation ``name``'s ``rounds`` in the run in ``out``: its log names the run's
    attackers (one adversary for the run), and each round ran its trust over exactly the
    cohort the strategy dealt it (``cohorts``) and passes :func:`check_defended_round`.
    Returns each round's aggregate and flagged clients."""
    folder = out / "tasks" / name
    # one adversary for the run: every federation's log names the same malicious clients
    assert attackers_of(folder) == attackers
    checked = []
    for outcome in rounds:
        cohort = cohorts[(outcome.round, name)]
        assert sorted(outcome.participants) == cohort  # the trust ran over this cohort
        checked.append(check_defended_round(outcome, cohort, folder, attackers, seen))
    return checked


def check_masking_rounds(
    folder: Path, cohorts: Mapping[tuple[int, str], list[int]], name: str, attackers: set[int]
) -> set[int]:
    """Federation ``name`` (its log in ``folder``) under masking with trust: its sub-cohorts
    partition exactly its cohorts, each >= min_cohort 3; ``trust.dormant.reset`` acted on
    every round that released; every flagged sub-cohort holds an attacker and none of its
    members survived. Returns the members of the flagged sub-cohorts."""
    for split in events_of(folder, "secagg_cohorts"):
        blocks = [sorted(b) for b in split["cohorts"]]
        cohort = cohorts[(split["round"], name)]
        # the sub-cohorts partition exactly this federation's cohort, each >= min_cohort
        assert sorted(c for b in blocks for c in b) == cohort
        assert len(blocks) == len(cohort) // 3 and all(len(b) >= 3 for b in blocks)
    completed = {e["round"]: e for e in events_of(folder, "round_completed")}
    # trust.dormant.reset (on under masking) acts on every round that released
    pruned = {e["round"] for e in events_of(folder, "trust_prune")}
    assert pruned == {r for r, e in completed.items() if e["survivors"]}
    flagged_members: set[int] = set()
    for flag in events_of(folder, "trust_cohort_flag"):
        members = set(flag["members"])
        assert members & attackers  # every flagged sub-cohort holds an attacker
        assert not members & set(completed[flag["round"]]["survivors"])
        flagged_members |= members
    return flagged_members


def history_rows(history: list[dict[str, Any]]) -> str:
    """A run's history without its timings, as JSON: NaN (not evaluated) == NaN."""
    stripped = [{k: v for k, v in r.items() if k != "time_s"} for r in history]
    return json.dumps(stripped, sort_keys=True)


def assert_same_models(whole: Any, resumed: Any, names: Iterable[str]) -> None:
    """Each named final model of the two runs has the same weights, bit for bit."""
    for name in names:
        for a, b in zip(
            whole.models[name].state_dict().values(),
            resumed.models[name].state_dict().values(),
            strict=True,
        ):
            assert np.array_equal(a.numpy(), b.numpy())


def trust_log(folder: Path, strategy_events: str) -> list[dict[str, Any]]:
    """``folder``'s trust, sub-cohort, adversary and ``strategy_events`` (a prefix) events,
    without their sequence numbers and times."""
    return [
        {k: v for k, v in e.items() if k not in ("seq", "time")}
        for e in read_events(folder / "events.jsonl")
        if e["event"].startswith(("trust_", "secagg_cohort", "adversary_", strategy_events))
    ]


def assert_same_trust_run(
    whole: Any, resumed: Any, a: Path, b: Path, names: Iterable[str], strategy_events: str
) -> None:
    """The run in ``b`` (cut and resumed) is the run in ``a`` (whole): the same history,
    the same trust and strategy decisions in the run's log and each federation's, the same
    final models."""
    assert history_rows(resumed.history) == history_rows(whole.history)
    assert trust_log(b, strategy_events) == trust_log(a, strategy_events)
    for name in names:
        assert trust_log(b / "tasks" / name, strategy_events) == trust_log(
            a / "tasks" / name, strategy_events
        )
        assert_same_models(whole, resumed, [name])
