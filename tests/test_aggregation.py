"""Server aggregation: FedAvg is the exact sample-weighted mean; bad updates are excluded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfl.audit.events import EventLog, read_events
from secfl.config import ServerConfig
from secfl.encode.flatten import model_hash
from secfl.errors import UpdateError
from secfl.messages import ClientFailure, FitIns, FitRes
from secfl.randomness import Randomness
from secfl.server.aggregate import WeightedSum
from secfl.server.optimizers import make_server_optimizer
from secfl.server.protection import PlaintextProtection, RoundContext


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_weighted_mean_equals_exact_weighted_mean(n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, d)).astype(np.float32)
    ws = rng.integers(1, 1000, size=n).astype(np.float64)
    total = WeightedSum(d)
    for i in range(n):
        total.add(i, xs[i], float(ws[i]))
    exact = (ws[:, None] * xs.astype(np.float64)).sum(axis=0) / ws.sum()
    assert np.allclose(total.weighted_mean(), exact, rtol=1e-5, atol=1e-6)
    assert total.total_weight == ws.sum()


def test_weighted_sum_refuses_bad_input() -> None:
    total = WeightedSum(3)
    with pytest.raises(UpdateError, match=r"shape \(4,\), expected \(3,\)"):
        total.add(0, np.zeros(4, np.float32), 1.0)
    with pytest.raises(UpdateError, match="positive finite"):
        total.add(0, np.zeros(3, np.float32), 0.0)
    total.add(1, np.zeros(3, np.float32), 1.0)
    with pytest.raises(UpdateError, match="second update"):
        total.add(1, np.zeros(3, np.float32), 1.0)
    total.add(2, np.array([np.nan, 0, 0], np.float32), 1.0)
    with pytest.raises(UpdateError, match=r"clients \[2\] sent NaN/Inf"):
        total.weighted_mean()


class _Scripted:
    def __init__(self, replies: dict[int, bytes | None]) -> None:
        self.replies = replies

    def exchange(self, requests):  # type: ignore[no-untyped-def]
        return {cid: self.replies[cid] for cid in requests}


def test_plaintext_protection_excludes_bad_updates_and_records_why(tmp_path: Path) -> None:
    weights = np.zeros(4, np.float32)
    ins = FitIns(round=2, attempt=0, model_hash=model_hash(weights), weights=weights)

    def res(cid: int, update: list[float], n: int = 10, **kw: object) -> bytes:
        fields = dict(
            round=2, attempt=0, client_id=cid, model_hash=ins.model_hash,
            num_samples=n, train_loss=1.0, update=np.array(update, np.float32),
        )  # fmt: skip
        fields.update(kw)
        return FitRes(**fields).to_bytes()  # type: ignore[arg-type]

    replies: dict[int, bytes | None] = {
        0: res(0, [1, 1, 1, 1], n=10),
        1: res(1, [3, 3, 3, 3], n=30),
        2: res(2, [np.inf, 0, 0, 0]),
        3: res(3, [1, 2, 3]),
        4: None,
        5: res(5, [9, 9, 9, 9], round=1),
        6: res(6, [9, 9, 9, 9], model_hash=b"x" * 32),
        7: ClientFailure(round=2, client_id=7, reason="out of memory").to_bytes(),
        8: res(9, [9, 9, 9, 9]),
    }
    events = EventLog(tmp_path / "e.jsonl")
    ctx = RoundContext(2, 0, ins, 4, Randomness("seeded", 0), events)
    result = PlaintextProtection().aggregate(_Scripted(replies), list(replies), ctx)
    events.close()
    assert result is not None
    assert result.survivors == (0, 1)
    assert np.allclose(result.mean_update, 2.5)  # (10*1 + 30*3) / 40
    assert result.total_weight == 40
    reasons = result.dropped
    assert set(reasons) == {2, 3, 4, 5, 6, 7, 8}
    assert "NaN/Inf" in reasons[2] and "shape (3,)" in reasons[3] and "no reply" in reasons[4]
    assert "round 1" in reasons[5] and "model_hash" in reasons[6]
    assert "out of memory" in reasons[7] and "claims client id 9" in reasons[8]
    logged = {e["client"] for e in read_events(tmp_path / "e.jsonl") if "client" in e}
    assert logged == set(reasons)


def test_server_optimisers_follow_their_formulas() -> None:
    delta = np.array([0.5, -1.0], np.float32)
    w = np.zeros(2, np.float32)
    make_server_optimizer(ServerConfig(optimizer="fedavg", lr=2.0), 2).step(w, delta)
    assert np.allclose(w, [1.0, -2.0])

    w = np.zeros(2, np.float32)
    opt = make_server_optimizer(ServerConfig(optimizer="fedavgm", lr=1.0, momentum=0.5), 2)
    opt.step(w, delta)
    opt.step(w, delta)  # m = 0.5*d + d = 1.5 d; w = d + 1.5 d
    assert np.allclose(w, 2.5 * delta)

    cfg = ServerConfig(optimizer="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w = np.zeros(2, np.float32)
    opt = make_server_optimizer(cfg, 2)
    opt.step(w, delta)
    m = 0.1 * delta
    v = 0.01 * delta**2
    assert np.allclose(w, 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    state = opt.state_dict()
    fresh = make_server_optimizer(cfg, 2)
    fresh.load_state_dict(state)
    assert all(np.array_equal(fresh.state[k], state[k]) for k in state)
