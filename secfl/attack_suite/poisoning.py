"""A one-seed subset of the trust benchmark's poisoning attacks against the configuration.

Each attack of :data:`SUBSET` runs the configuration itself through ``secfl.runner.run`` with
an ``adversary:`` block (``docs/attacks.md``: colluding, omniscient attackers, the pinned
parameters of ``secfl.bench.trust.ATTACKS``), f = 40% of the clients (4 of 10, the trust
issue's harder setting). The clean reference is the suite's own run of the configuration
(same seed, rounds and clients). Measured as the trust benchmark does: the accuracy drop in
points at the final round, and the backdoor's attack success rate minus the clean model's
trigger rate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from secfl.config import RunConfig
from secfl.data.federated import FederatedData

#: The attacks run (labels of ``secfl.bench.trust.ATTACKS``).
SUBSET = ("sign_flip", "alie", "backdoor")
#: Share of the clients that are malicious.
FRACTION = 0.4


def poisoning_subset(
    config: RunConfig,
    data: FederatedData,
    *,
    clean_model: nn.Module,
    clean_accuracy: float,
    folder: Path,
    attacks: tuple[str, ...] = SUBSET,
) -> dict[str, Any]:
    from secfl.attacks import get_attack
    from secfl.bench.trust import ATTACKS, backdoor_success_rate
    from secfl.runner import run

    count = max(1, int(FRACTION * config.data.num_clients))
    backdoor = get_attack("backdoor", ATTACKS["backdoor"][1])
    clean_rate = backdoor_success_rate(clean_model, data.test.x, data.test.y, backdoor)
    rows: dict[str, Any] = {}
    for label in attacks:
        attack, params = ATTACKS[label]
        attacked = config.with_overrides(
            name=f"{config.name}-{label}",
            adversary={
                "attack": attack,
                "count": count,
                "collusion": True,
                "omniscient": True,
                "params": params,
            },
        )
        started = time.perf_counter()
        result = run(attacked, folder / label)
        accuracy = float(result.history[-1]["accuracy"])
        row: dict[str, Any] = {
            "accuracy": accuracy,
            # rounded: accuracies are counts over the test split; 5.000000000000004 is 5
            "drop_points": round(100.0 * (clean_accuracy - accuracy), 6),
            "seconds": time.perf_counter() - started,
        }
        if label == "backdoor":
            rate = backdoor_success_rate(result.model, data.test.x, data.test.y, backdoor)
            row["trigger_rate"] = rate
            row["asr"] = max(0.0, rate - clean_rate)
        rows[label] = row
    metrics = {
        "poisoning.worst_acc_drop": max(r["drop_points"] for r in rows.values()),
    }
    if "backdoor" in rows:
        metrics["poisoning.backdoor_asr"] = rows["backdoor"]["asr"]
    return {
        "metrics": metrics,
        "details": {
            "malicious": count,
            "clients": config.data.num_clients,
            "clean_accuracy": clean_accuracy,
            "clean_trigger_rate": clean_rate,
            "attacks": rows,
        },
    }
