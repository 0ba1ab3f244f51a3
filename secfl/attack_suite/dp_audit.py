"""Auditing differential privacy with canaries: an empirical lower bound on epsilon.

The game (Jagielski et al. 2020; Nasr et al. 2021, 2023): each canary is included or not by a
fair coin; the auditor sees the mechanism's output and scores each canary; a threshold on the
score guesses "included". For an (epsilon, delta)-DP mechanism every test satisfies
``TPR <= e^epsilon FPR + delta`` and ``1 - FPR <= e^epsilon (1 - TPR) + delta``, so with
Clopper–Pearson bounds (99% confidence, split across the two rates) on the measured rates,
``epsilon >= log((1 - delta - FNR_hi) / FPR_hi)`` (or the mirrored test) holds with 99%
confidence. The threshold and direction are chosen on a calibration quarter of the trials
and the bound is computed on the other three quarters, so the choice costs no confidence.

**White-box** (the strongest adversary DP protects against): the auditor controls each
canary's gradient (or each canary client's update) and sees the mechanism's output. Canaries
are Dirac: canary ``i`` owns coordinate ``i`` of a bank model that nothing else touches, so
each coordinate is an independent run of the one-record (one-client) mechanism and one
training run yields thousands of trials (the idea behind Steinke, Nasr and Jagielski 2023,
"Privacy auditing with one (1) training run", and Andrew et al. 2024). Record canaries run
through the configuration's real local training: :func:`secfl.privacy.dpsgd.train_dp_sgd`
with the calibrated noise multiplier, clip, sampling rate and every round's steps (the sum
of the noised gradients is what the final model encodes), or plain
:func:`secfl.client.trainer.train_locally` without DP. Client canaries run through the
configuration's user-level mechanism (central Gaussian, or the sum of the honest Skellam /
Gaussian shares a revealed sum carries), every round.

**Black-box**: mislabelled records inserted into a real client, trained through the real
protection mode, scored by their loss under the model the server ends up with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta
from torch import nn

from secfl.config import RunConfig
from secfl.data.datasets import Dataset
from secfl.data.federated import FederatedData
from secfl.randomness import Randomness

#: Confidence of every reported lower bound.
CONFIDENCE = 0.99
#: Share of the trials used to choose the threshold.
CALIBRATION_SHARE = 0.25


def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided upper bound on a rate from ``errors`` of ``trials`` at confidence 1-alpha."""
    if trials <= 0:
        return 1.0
    if errors >= trials:
        return 1.0
    return float(beta.ppf(1.0 - alpha, errors + 1, trials - errors))


def max_certifiable_epsilon(trials_out: int, trials_in: int, delta: float) -> float:
    """The bound a perfect separation of these many evaluation trials gives: the most any
    audit of this size can certify."""
    alpha = (1.0 - CONFIDENCE) / 2
    fpr = clopper_pearson_upper(0, trials_out, alpha)
    fnr = clopper_pearson_upper(0, trials_in, alpha)
    return max(0.0, math.log(max(1.0 - delta - fnr, 1e-300) / fpr))


@dataclass(frozen=True)
class AuditResult:
    epsilon_lb: float
    #: What a perfect separation of the same evaluation trials would certify.
    max_certifiable: float
    trials: int
    threshold: float
    direction: str
    fpr: float
    fnr: float

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "epsilon_lb": self.epsilon_lb,
            "max_certifiable": self.max_certifiable,
            "trials": self.trials,
            "threshold": self.threshold,
            "direction": self.direction,
            "fpr": self.fpr,
            "fnr": self.fnr,
        }


def _point_epsilon(fp: int, n_out: int, fn: int, n_in: int, delta: float) -> float:
    # pseudo-counts keep a calibration without errors from choosing an extreme threshold
    fpr = (fp + 1.0) / (n_out + 2.0)
    fnr = (fn + 1.0) / (n_in + 2.0)
    return math.log(max(1.0 - delta - fnr, 1e-300) / fpr)


def _rates(scores: np.ndarray, member: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    guess = scores > threshold
    fp = int(np.sum(guess & ~member))
    fn = int(np.sum(~guess & member))
    return fp, int(np.sum(~member)), fn, int(np.sum(member))


def epsilon_lower_bound(
    scores: np.ndarray, member: np.ndarray, *, delta: float, order: np.ndarray
) -> AuditResult:
    """The Clopper–Pearson epsilon lower bound of the threshold test on ``scores`` (higher:
    more likely a member). ``order`` (a permutation of the trials, from the audit's own
    randomness) puts the calibration quarter first."""
    scores = np.asarray(scores, np.float64)[order]
    member = np.asarray(member, bool)[order]
    split = int(len(scores) * CALIBRATION_SHARE)
    cal_s, cal_m = scores[:split], member[:split]
    ev_s, ev_m = scores[split:], member[split:]
    candidates = np.unique(cal_s)
    if candidates.size > 400:
        candidates = np.quantile(cal_s, np.linspace(0.0, 1.0, 401))
    best = (-math.inf, 0.0, "direct")
    for threshold in candidates:
        fp, n_out, fn, n_in = _rates(cal_s, cal_m, float(threshold))
        high = _point_epsilon(fp, n_out, fn, n_in, delta)
        # the mirrored inequality of the same test: 1 - FPR <= e^eps FNR + delta
        low = _point_epsilon(fn, n_in, fp, n_out, delta)
        if high > best[0]:
            best = (high, float(threshold), "direct")
        if low > best[0]:
            best = (low, float(threshold), "mirrored")
    _, threshold, direction = best
    fp, n_out, fn, n_in = _rates(ev_s, ev_m, threshold)
    if direction == "mirrored":
        fp, n_out, fn, n_in = fn, n_in, fp, n_out
    alpha = (1.0 - CONFIDENCE) / 2
    fpr_hi = clopper_pearson_upper(fp, n_out, alpha)
    fnr_hi = clopper_pearson_upper(fn, n_in, alpha)
    value = 1.0 - delta - fnr_hi
    epsilon = math.log(value / fpr_hi) if value > 0 else 0.0
    return AuditResult(
        epsilon_lb=max(0.0, epsilon),
        max_certifiable=max_certifiable_epsilon(n_out, n_in, delta),
        trials=len(scores),
        threshold=threshold,
        direction=direction,
        fpr=fp / max(n_out, 1),
        fnr=fn / max(n_in, 1),
    )


# ---------------------------------------------------------------------------- white-box


class CanaryBank(nn.Module):
    """Canary ``i`` (input ``[i]``) reads only row ``i``: its gradient is Dirac in that row.
    The logits are scaled so that every canary's gradient is far above any clip norm."""

    def __init__(self, canaries: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(canaries, 2))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x.reshape(x.shape[0], -1)[:, 0].long()
        return nn.functional.embedding(index, self.weight) * self.scale


class GradientSum(torch.optim.Optimizer):
    """An optimiser that leaves the parameters alone and adds up every gradient it is given:
    the white-box auditor's view of all the (noised) steps."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__(list(params), {})
        self.sums = [
            torch.zeros_like(p, dtype=torch.float64) for p in self.param_groups[0]["params"]
        ]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        for total, p in zip(self.sums, self.param_groups[0]["params"]):
            if p.grad is not None:
                total.add_(p.grad.to(torch.float64))
        return None


def _inclusion(randomness: Randomness, purpose: str, rep: int, count: int) -> np.ndarray:
    return randomness.stream(purpose, attempt=rep, party="auditor").bernoulli(0.5, count)


def _canary_data(included: np.ndarray) -> Dataset:
    index = np.flatnonzero(included).astype(np.float32).reshape(-1, 1)
    return Dataset("canaries", index, np.zeros(len(index), dtype=np.int64), 2)


def record_canary_scores(
    config: RunConfig,
    randomness: Randomness,
    *,
    canaries: int,
    repetitions: int,
    rounds: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, included) of white-box record canaries through the configuration's local
    training, ``rounds`` rounds (default: all of the configuration's)."""
    from secfl.client.trainer import train_locally
    from secfl.privacy.dpsgd import train_dp_sgd
    from secfl.privacy.federation import sample_level_settings

    sample = config.privacy.sample_level
    rounds = config.rounds if rounds is None else rounds
    settings = sample_level_settings(config) if sample is not None else None
    scores: list[np.ndarray] = []
    members: list[np.ndarray] = []
    for rep in range(repetitions):
        included = _inclusion(randomness, "audit.record_canaries", rep, canaries)
        data = _canary_data(included)
        if sample is not None and settings is not None:
            # a bias-free linear bank on one-hot inputs: the layerwise per-sample engine
            # (the one real runs use) clips and sums without materialising every gradient
            linear = nn.Linear(canaries, 2, bias=False)
            nn.init.zeros_(linear.weight)
            inputs = torch.zeros(len(data), canaries)
            inputs[torch.arange(len(data)), torch.from_numpy(data.x[:, 0]).long()] = (
                100.0 * sample.max_grad_norm
            )
            recorder = GradientSum(list(linear.parameters()))
            for r in range(1, rounds + 1):
                train_dp_sgd(
                    linear,
                    inputs,
                    torch.from_numpy(data.y),
                    recorder,
                    settings,
                    sampling_stream=randomness.stream(
                        "audit.dp_sampling", round_index=r, attempt=rep, party="auditor"
                    ),
                    noise_stream=randomness.stream(
                        "audit.dp_noise", round_index=r, attempt=rep, party="auditor"
                    ),
                    round_index=r,
                    attempt=rep,
                    party="auditor",
                )
            # the canary's gradient points to (-1, +1) in its row (label 0, logits 0)
            total = recorder.sums[0].numpy()  # (2, canaries)
            score = total[1] - total[0]
        else:
            bank = CanaryBank(canaries, scale=100.0)
            start = bank.weight.detach().clone()
            for r in range(1, rounds + 1):
                stream = randomness.stream(
                    "audit.batch_order", round_index=r, attempt=rep, party="auditor"
                )
                train_locally(bank, data, config.client, stream)
            delta = (bank.weight.detach() - start).numpy().astype(np.float64)
            score = delta[:, 0] - delta[:, 1]
        scores.append(score)
        members.append(included)
    return np.concatenate(scores), np.concatenate(members)


def client_canary_scores(
    config: RunConfig,
    randomness: Randomness,
    *,
    model_size: int,
    trials: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, included) of white-box client canaries through the configuration's user-level
    mechanism, every round: canary ``i`` is a client whose update is the clip norm times the
    unit vector ``e_i`` (or zero when excluded); the auditor knows every other contribution,
    so the released sum minus them is the canaries' sum plus the mechanism's noise."""
    from secfl.privacy.central import CentralGaussianMechanism
    from secfl.privacy.distributed import DistributedNoise, user_level_mechanism

    mechanism = user_level_mechanism(config, model_size)
    repetitions = max(1, math.ceil(trials / model_size))
    scores: list[np.ndarray] = []
    members: list[np.ndarray] = []
    for rep in range(repetitions):
        included = _inclusion(randomness, "audit.client_canaries", rep, model_size)
        total = np.zeros(model_size, dtype=np.float64)
        for r in range(1, config.rounds + 1):
            stream = randomness.stream(
                "audit.user_noise", round_index=r, attempt=rep, party="auditor"
            )
            if isinstance(mechanism, CentralGaussianMechanism):
                from secfl.privacy.central import clip_to_norm

                unit = np.zeros(model_size)
                unit[0] = mechanism.clip_norm
                one = mechanism.weight(1) * float(clip_to_norm(unit, mechanism.clip_norm)[0])
                total += included * one + stream.normal(model_size) * mechanism.noise_std
            elif isinstance(mechanism, DistributedNoise):
                unit = np.zeros(model_size)
                unit[0] = mechanism.clip_norm
                one = float(mechanism.client_value(unit, 1)[0] * mechanism.scale)
                if mechanism.kind == "skellam":
                    one = float(np.round(one))
                threshold, contributors = _shares(config, mechanism)
                honest = contributors - mechanism.colluding
                std = mechanism.client_std(threshold)
                if mechanism.kind == "skellam":
                    from secfl.privacy.discrete import sample_skellam

                    # a sum of Skellam shares is Skellam with the summed variance
                    noise = sample_skellam(stream, honest * std * std / 2.0, model_size)
                else:
                    noise = stream.normal(model_size) * std * math.sqrt(honest)
                total += included * one + np.asarray(noise, dtype=np.float64)
            else:  # no user-level DP: the released sum holds the canary exactly
                total += included * 1.0
        scores.append(total)
        members.append(included)
    return np.concatenate(scores), np.concatenate(members)


def _shares(config: RunConfig, mechanism: object) -> tuple[int, int]:
    """(threshold t, contributors) of a round where every sampled client contributes."""
    sampling = config.server.sampling
    n = config.data.num_clients
    share = float(getattr(sampling, "fraction", None) or getattr(sampling, "rate", None) or 1.0)
    per_round = int(getattr(sampling, "clients_per_round", None) or max(2, round(n * share)))
    if config.aggregation.protection == "masking":
        from secfl.secagg.params import derive_params

        params = derive_params(
            config.aggregation.masking.model_copy(
                update={"clip_range": getattr(mechanism, "clip_norm", 1.0), "weighting": "uniform"}
            ),
            n=per_round,
            min_cohort=config.aggregation.min_cohort,
            noise=mechanism,  # type: ignore[arg-type]
        )
        return int(params.threshold), per_round
    return config.aggregation.min_cohort, per_round


# ---------------------------------------------------------------------------- black-box


def black_box_record_scores(
    config: RunConfig,
    data: FederatedData,
    randomness: Randomness,
    *,
    folder: Path,
    canaries: int,
    rounds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, included) of mislabelled record canaries placed in client 0's data and
    trained through the configuration's real protection mode for ``rounds`` rounds. The
    score is minus the canary's loss under the model the server ends with: the global model,
    or in mode ``none`` the global model plus client 0's last update (which the server saw)."""
    from secfl.attack_suite.observe import ProbeFederation, initial_weights
    from secfl.encode.flatten import load_parameters
    from secfl.server.optimizers import make_server_optimizer

    draw = randomness.stream("audit.black_box_canaries", party="auditor").numpy_generator()
    everything = np.concatenate([c.x for c in data.clients])
    low, high = float(everything.min()), float(everything.max())
    x = draw.uniform(low, high, size=(canaries, *data.input_shape)).astype(np.float32)
    y = draw.integers(0, data.num_classes, size=canaries).astype(np.int64)
    included = _inclusion(randomness, "audit.black_box_inclusion", 0, canaries)
    target = data.clients[0]
    planted = Dataset(
        target.name,
        np.concatenate([target.x, x[included]]),
        np.concatenate([target.y, y[included]]),
        target.num_classes,
    )
    federation = ProbeFederation(
        config,
        [planted, *data.clients[1:]],
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        folder=folder,
    )
    try:
        weights = initial_weights(config, data)
        optimizer = make_server_optimizer(config.server, weights.size)
        observed = weights
        for r in range(1, rounds + 1):
            view = federation.round(weights, r)
            if 0 in view.individual:
                observed = weights + view.individual[0]
            if view.released is not None:
                optimizer.apply_update(weights, view.released, kind=config.client.update_kind)
            if not view.individual:
                observed = weights
        model = federation.model_factory()
        load_parameters(model, np.asarray(observed, np.float32))
    finally:
        federation.close()
    from secfl.attack_suite.membership import per_record

    loss, _ = per_record(model, Dataset("canaries", x, y, data.num_classes))
    return -loss, included
