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


def _client_records(data: FederatedData, client: int, start: int, count: int) -> Dataset:
    part = data.clients[client]
    index = (np.arange(start, start + count) % len(part)).astype(np.int64)
    return part.subset(index)


def probe_clients(config: RunConfig) -> int:
    """How many clients a probe round has: the configuration's clients up to 10, at least
    the smallest cohort the mode may reveal."""
    return max(min(config.data.num_clients, 10), config.aggregation.min_cohort, 2)


def run_probe(
    config: RunConfig,
    data: FederatedData,
    spec: ProbeSpec,
    *,
    folder: Path,
    optimisation: OptimisationSettings,
    geiping_targets: int,
    geiping_max_records: int,
    examples: int = 4,
) -> ProbeOutcome:
    clients = probe_clients(config)
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
    bounds = (float(everything.min()), float(everything.max()))
    data_range = bounds[1] - bounds[0] or 1.0
    mean_image = (data.shared.x if len(data.shared) else data.test.x).mean(axis=0)
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
            view = federation.round(weights, rep + 1)
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
                shaped = candidates.reshape(len(candidates), *data.input_shape)
                analytic, picks = best_match(shaped, truth.x, data_range, bounds)
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
                    optimised, opt_picks = best_match(rebuilt, truth.x, data_range, bounds)
                else:
                    if optimised_targets < geiping_targets:
                        outcome.skipped.append(
                            f"optimisation attack on {len(truth)} records (> {geiping_max_records})"
                        )
                    rebuilt, optimised, opt_picks = None, np.full(len(truth), -np.inf), None
                outcome.psnr["analytic"].extend(analytic.tolist())
                outcome.psnr["optimisation"].extend(optimised.tolist())
                for i in range(len(truth)):
                    outcome.baseline.append(psnr(mean_image, truth.x[i], data_range))
                    if len(outcome.examples) >= examples:
                        continue
                    if analytic[i] >= optimised[i] and picks[i] >= 0:
                        rec = np.clip(shaped[picks[i]], *bounds)
                        outcome.examples.append((truth.x[i], rec, "analytic", float(analytic[i])))
                    elif rebuilt is not None and opt_picks is not None:
                        rec = rebuilt[opt_picks[i]]
                        outcome.examples.append(
                            (truth.x[i], rec, "optimisation", float(optimised[i]))
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
