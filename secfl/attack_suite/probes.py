"""Gradient-inversion probes: FedSGD with batch 1 and 8, and FedAvg, through the real mode.

Each probe gives every probe client a few of its own records, runs one round of the
configuration's protocol (:class:`~secfl.attack_suite.observe.ProbeFederation`) from the
round-1 global model, and inverts what the server observed: each client's update in mode
``none``; the released mean (and sub-cohort means) under ``masking`` / ``ckks``, whose truth
is every record that went into it. Repetitions use fresh records and fresh rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from secfl.attack_suite.inversion import (
    OptimisationSettings,
    best_match,
    invert_analytic,
    invert_by_optimisation,
    psnr,
)
from secfl.attack_suite.observe import ProbeFederation, fedsgd_client_config, initial_weights
from secfl.config import RunConfig
from secfl.data.datasets import Dataset
from secfl.data.federated import FederatedData

#: Reconstructions above this PSNR count as reconstructed (the issue's threshold).
RECONSTRUCTED_DB = 20.0


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    #: Records per client.
    records: int
    #: True: one local step on all the records (FedSGD); False: the configured local training.
    fedsgd: bool
    repetitions: int


@dataclass
class ProbeOutcome:
    name: str
    observed: str
    #: Per true record: best PSNR by attack, and the mean-image baseline.
    psnr: dict[str, list[float]] = field(default_factory=dict)
    baseline: list[float] = field(default_factory=list)
    #: (truth, reconstruction) pairs for the report, a few per probe.
    examples: list[tuple[np.ndarray, np.ndarray, str, float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def best(self) -> np.ndarray:
        return np.max(np.array(list(self.psnr.values())), axis=0)

    def summary(self) -> dict[str, object]:
        best = self.best()
        gain = best - np.array(self.baseline)
        return {
            "observed": self.observed,
            "records": len(self.baseline),
            "share_above_20db": float(np.mean(best > RECONSTRUCTED_DB)),
            "median_psnr_db": float(np.median(best)),
            "median_baseline_db": float(np.median(self.baseline)),
            "median_gain_db": float(np.median(gain)),
            "by_attack": {
                name: {
                    "share_above_20db": float(np.mean(np.array(v) > RECONSTRUCTED_DB)),
                    "median_psnr_db": float(np.median(v)),
                }
                for name, v in self.psnr.items()
            },
            "skipped": self.skipped,
        }


@dataclass(frozen=True, eq=False)
class RecordSpace:
    """The dataset's own units, where PSNR is measured: model inputs standardised with the
    shared set's statistics (``data.standardize``) are mapped back, so a 20 dB threshold
    means the same for every configuration of a dataset (digits: pixels in [0, 1])."""

    mean: np.ndarray | None
    std: np.ndarray | None
    bounds: tuple[float, float]
    #: The mean image of the public shared set, in these units (the baseline).
    mean_image: np.ndarray

    @property
    def data_range(self) -> float:
        return (self.bounds[1] - self.bounds[0]) or 1.0

    def to_raw(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.mean is None or self.std is None:
            return x
        flat = x.reshape(len(x), -1) * self.std + self.mean
        return flat.reshape(x.shape)


def record_space(config: RunConfig, data: FederatedData) -> RecordSpace:
    """The :class:`RecordSpace` of ``config``'s data (same split: standardising draws no
    randomness, so the unstandardised build holds the same records in the same order)."""
    from secfl.data.federated import build_federated_data
    from secfl.randomness import Randomness

    raw = build_federated_data(
        config.data.model_copy(update={"standardize": "none"}),
        Randomness(config.security.randomness, config.seed),
    )
    everything = np.concatenate([c.x for c in raw.clients])
    bounds = (float(everything.min()), float(everything.max()))
    source = raw.shared if len(raw.shared) else raw.test
    mean_image = source.x.mean(axis=0).astype(np.float64)
    if all(np.array_equal(a.x, b.x) for a, b in zip(raw.clients, data.clients)):
        return RecordSpace(None, None, bounds, mean_image)
    flat = raw.shared.x.reshape(len(raw.shared), -1).astype(np.float64)
    std = flat.std(axis=0)
    std[std < 1e-6] = 1.0
    return RecordSpace(flat.mean(axis=0), std, bounds, mean_image)


def _client_records(data: FederatedData, client: int, start: int, count: int) -> Dataset:
    part = data.clients[client]
    index = (np.arange(start, start + count) % len(part)).astype(np.int64)
    return part.subset(index)


def probe_clients(config: RunConfig, colluders: int = 0) -> int:
    """How many clients a probe round has: the configuration's clients up to 10, at least
    the smallest cohort the mode may reveal (plus the colluders, who do not count in it)."""
    return max(min(config.data.num_clients, 10), config.aggregation.min_cohort + colluders, 2)


def run_probe(
    config: RunConfig,
    data: FederatedData,
    spec: ProbeSpec,
    *,
    folder: Path,
    optimisation: OptimisationSettings,
    space: RecordSpace,
    geiping_targets: int,
    geiping_max_records: int,
    examples: int = 4,
    colluders: int = 0,
) -> ProbeOutcome:
    """One probe. ``colluders`` (threat model ``server+clients``, modes ``masking`` and
    ``ckks``): the last ``colluders`` clients pool everything with the server, which
    subtracts their contributions (updates and noise shares) from every sum; the coalition's
    view is therefore a round among the honest clients alone, and that is what runs."""
    clients = probe_clients(config, colluders)
    owners = [i % len(data.clients) for i in range(clients)]
    first = [
        _client_records(data, owner, 0 + 97 * (i // len(data.clients)), spec.records)
        for i, owner in enumerate(owners)
    ]
    federation = ProbeFederation(
        config,
        first,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        folder=folder,
        client_config=fedsgd_client_config(config, spec.records) if spec.fedsgd else None,
    )
    weights = initial_weights(config, data)
    everything = np.concatenate([c.x for c in data.clients])
    # the optimisation attack searches the model's input box; PSNR is in the record space
    bounds = (float(everything.min()), float(everything.max()))
    mode = config.aggregation.protection
    outcome = ProbeOutcome(
        spec.name,
        "each client's update"
        if mode == "none"
        else "the released aggregate (and sub-cohort means)",
    )
    outcome.psnr = {"analytic": [], "optimisation": []}
    model = federation.model_factory()
    optimised_targets = 0
    try:
        for rep in range(spec.repetitions):
            records = [
                _client_records(data, owner, rep * spec.records + 97 * (i // len(data.clients)),
                                spec.records)
                for i, owner in enumerate(owners)
            ]  # fmt: skip
            for app, part in zip(federation.clients, records):
                app.data = part
            honest = None
            if colluders and config.aggregation.protection != "none":
                honest = [c.client_id for c in federation.clients][: clients - colluders]
            view = federation.round(weights, rep + 1, participants=honest)
            targets: list[tuple[np.ndarray, Dataset]] = []
            if mode == "none":
                targets = [(u, records[cid]) for cid, u in sorted(view.individual.items())]
            elif view.released is not None:
                in_sum = [records[c] for c in view.survivors]
                pooled = Dataset(
                    "sum",
                    np.concatenate([d.x for d in in_sum]),
                    np.concatenate([d.y for d in in_sum]),
                    data.num_classes,
                )
                targets = [(view.released, pooled)]
                targets += [(mean, pooled) for _, mean in sorted(view.cohorts.items())]
            else:
                outcome.skipped.append(f"repetition {rep}: the round revealed nothing")
            for update, truth in targets:
                from secfl.encode.flatten import load_parameters

                load_parameters(model, weights)
                candidates = invert_analytic(model, update)
                shaped = space.to_raw(candidates.reshape(len(candidates), *data.input_shape))
                truth_raw = space.to_raw(truth.x)
                analytic, picks = best_match(shaped, truth_raw, space.data_range, space.bounds)
                if optimised_targets < geiping_targets and len(truth) <= geiping_max_records:
                    optimised_targets += 1
                    rebuilt = invert_by_optimisation(
                        model,
                        weights,
                        update,
                        truth.y,
                        input_shape=data.input_shape,
                        bounds=bounds,
                        settings=optimisation,
                    )
                    rebuilt = space.to_raw(rebuilt)
                    optimised, opt_picks = best_match(
                        rebuilt, truth_raw, space.data_range, space.bounds
                    )
                else:
                    if optimised_targets < geiping_targets:
                        outcome.skipped.append(
                            f"optimisation attack on {len(truth)} records (> {geiping_max_records})"
                        )
                    rebuilt, optimised, opt_picks = None, np.full(len(truth), -np.inf), None
                outcome.psnr["analytic"].extend(analytic.tolist())
                outcome.psnr["optimisation"].extend(optimised.tolist())
                for i in range(len(truth)):
                    outcome.baseline.append(psnr(space.mean_image, truth_raw[i], space.data_range))
                    if len(outcome.examples) >= examples:
                        continue
                    if analytic[i] >= optimised[i] and picks[i] >= 0:
                        rec = np.clip(shaped[picks[i]], *space.bounds)
                        outcome.examples.append((truth_raw[i], rec, "analytic", float(analytic[i])))
                    elif rebuilt is not None and opt_picks is not None:
                        rec = np.clip(rebuilt[opt_picks[i]], *space.bounds)
                        outcome.examples.append(
                            (truth_raw[i], rec, "optimisation", float(optimised[i]))
                        )
    finally:
        federation.close()
    return outcome


def inversion_metrics(outcomes: list[ProbeOutcome]) -> dict[str, float]:
    """The checked figures: the worst case over probes."""
    summaries = [o.summary() for o in outcomes if o.baseline]
    if not summaries:
        return {}
    return {
        "inversion.share_above_20db": max(float(s["share_above_20db"]) for s in summaries),  # type: ignore[arg-type]
        "inversion.median_psnr_gain_db": max(float(s["median_gain_db"]) for s in summaries),  # type: ignore[arg-type]
    }
