"""Accountants: the ledger reports exactly the libraries' own values; RDP libraries agree."""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from secfl.errors import BudgetExhausted, PrivacyError
from secfl.privacy import DpEvent, PartyLedger, calibrate_noise_multiplier, check_delta, epsilon


def _event(sigma: float, q: float, steps: int, round_index: int = 1) -> DpEvent:
    return DpEvent(
        mechanism="subsampled_gaussian",
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        sensitivity=1.0,
        level="sample",
        round=round_index,
        party="client:0",
    )


def _library_epsilon(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    if name in ("opacus_prv", "opacus_rdp"):
        acc = PRVAccountant() if name == "opacus_prv" else RDPAccountant()
        acc.history = list(history)
        return float(acc.get_epsilon(delta))
    lib = dpa.pld.PLDAccountant() if name == "dpa_pld" else dpa.rdp.RdpAccountant()
    for sigma, q, steps in history:
        lib.compose(
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
        )
    return float(lib.get_epsilon(delta))


@pytest.mark.parametrize("name", ["opacus_prv", "opacus_rdp", "dpa_pld", "dpa_rdp"])
def test_ledger_epsilon_equals_library_value(name: str) -> None:
    ledger = PartyLedger(party="client:0", level="sample", delta=1e-5, accountant_name=name, n=1000)
    for r in range(1, 4):  # three rounds with the same settings, one with other noise
        ledger.add(_event(1.1, 0.05, 20, r))
    ledger.add(_event(2.0, 0.05, 10, 4))
    expected = _library_epsilon(name, [(1.1, 0.05, 60), (2.0, 0.05, 10)], 1e-5)
    assert math.isclose(ledger.epsilon(), expected, rel_tol=1e-6)
    assert ledger.epsilon() > 0


@pytest.mark.parametrize("q", [0.01, 0.1])
@pytest.mark.parametrize("sigma", [0.8, 1.1])
@pytest.mark.parametrize("steps", [10, 100])
def test_opacus_rdp_and_dp_accounting_rdp_agree(q: float, sigma: float, steps: int) -> None:
    events = [_event(sigma, q, steps)]
    a = epsilon("opacus_rdp", events, 1e-5)
    b = epsilon("dpa_rdp", events, 1e-5)
    assert abs(a - b) / b <= 0.02, (a, b)


def test_composition_is_cumulative_not_per_round() -> None:
    one = epsilon("opacus_rdp", [_event(1.0, 0.1, 50)], 1e-5)
    ten = epsilon("opacus_rdp", [_event(1.0, 0.1, 50, r) for r in range(10)], 1e-5)
    assert ten > 2 * one  # the history is composed, not restarted each round
    assert ten < 10 * one  # and not summed naively


def test_unamplified_figure_is_larger() -> None:
    events = [_event(1.0, 0.1, 5)]
    assert epsilon("dpa_pld", events, 1e-5, amplified=False) > 3 * epsilon("dpa_pld", events, 1e-5)


def test_calibration_meets_target() -> None:
    sigma = calibrate_noise_multiplier(
        "opacus_rdp", target_epsilon=3.0, delta=1e-5, sampling_rate=0.1, steps=100
    )
    assert epsilon("opacus_rdp", [_event(sigma, 0.1, 100)], 1e-5) <= 3.0
    assert epsilon("opacus_rdp", [_event(sigma * 0.97, 0.1, 100)], 1e-5) > 3.0


def test_budget_check_and_invalid_values() -> None:
    ledger = PartyLedger(
        party="client:0",
        level="sample",
        delta=1e-5,
        accountant_name="opacus_rdp",
        n=100,
        budget=1.0,
        budget_key="privacy.budget.client_epsilon",
    )
    with pytest.raises(BudgetExhausted, match=r"privacy\.budget\.client_epsilon=1\.0"):
        ledger.charge_check([_event(0.8, 0.5, 100)])
    with pytest.raises(PrivacyError, match="unknown accountant"):
        PartyLedger(party="x", level="user", delta=1e-5, accountant_name="naive", n=10)
    with pytest.raises(PrivacyError, match=r"1/\(10 n\)"):
        check_delta(0.01, 100, key="privacy.user_level.delta", unit="clients")
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        _event(0.0, 0.1, 1)
    with pytest.raises(PrivacyError, match="sampling_rate"):
        _event(1.0, 1.5, 1)
