"""The message codec: exact round trips and every malformed input refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfl.errors import MessageError
from secfl.messages import ClientFailure, FitIns, FitRes
from secfl.wire import decode_message


def _fitres(update: np.ndarray) -> FitRes:
    return FitRes(
        round=7,
        attempt=1,
        client_id=3,
        model_hash=b"h" * 32,
        num_samples=120,
        train_loss=0.25,
        update=update,
    )


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False), max_size=64),
    reason=st.text(max_size=40),
)
def test_round_trip(values: list[float], reason: str) -> None:
    update = np.array(values, dtype=np.float32)
    back = FitRes.from_bytes(_fitres(update).to_bytes())
    assert (back.round, back.attempt, back.client_id, back.num_samples) == (7, 1, 3, 120)
    assert back.model_hash == b"h" * 32 and back.train_loss == 0.25
    assert np.array_equal(back.update, update)
    failure = ClientFailure(round=1, client_id=2, reason=reason)
    assert decode_message(failure.to_bytes()) == failure


def test_malformed_messages_are_refused_by_name() -> None:
    raw = _fitres(np.ones(4, np.float32)).to_bytes()
    with pytest.raises(MessageError, match="bad magic"):
        decode_message(b"XXXX" + raw[4:])
    with pytest.raises(MessageError, match="unknown message type"):
        decode_message(raw[:4] + b"\xff\xff" + raw[6:])
    with pytest.raises(MessageError, match="unsupported version 9"):
        decode_message(raw[:6] + b"\x09" + raw[7:])
    with pytest.raises(MessageError, match="FitRes.update: truncated"):
        decode_message(raw[:-1])
    with pytest.raises(MessageError, match="1 trailing bytes"):
        decode_message(raw + b"\x00")
    with pytest.raises(MessageError, match="too short"):
        decode_message(b"SF")
    with pytest.raises(MessageError, match="expected a FitIns"):
        FitIns.from_bytes(raw)


def test_arrays_decode_zero_copy_and_read_only() -> None:
    raw = _fitres(np.arange(5, dtype=np.float32)).to_bytes()
    update = FitRes.from_bytes(raw).update
    assert not update.flags.writeable
    assert update.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
