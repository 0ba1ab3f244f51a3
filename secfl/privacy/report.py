"""``secfl audit RUN_DIR``: print a run's privacy ledger in plain text.

``secfl.audit.verify`` verifies the audit log and receipts first; this reads and formats
``ledger.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secfl.errors import RunDirectoryError
from secfl.privacy.federation import LEDGER_FORMAT, LEDGER_NAME


def load_ledger(run_dir: Path) -> dict[str, Any]:
    path = run_dir / LEDGER_NAME
    if not path.exists():
        raise RunDirectoryError(
            f"{path} does not exist: the run configured no privacy mechanism "
            "(privacy.sample_level / privacy.user_level) or is not a secfl run directory"
        )
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if document.get("format") != LEDGER_FORMAT:
        raise RunDirectoryError(
            f"{path} has format {document.get('format')!r}, expected {LEDGER_FORMAT!r}"
        )
    return document


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def format_ledger(document: dict[str, Any]) -> str:
    lines = [
        f"privacy ledger ({document['format']}), randomness: {document['randomness']}",
    ]
    if document.get("stopped"):
        lines.append(f"run stopped: {document['stopped']}")
    cumulative = document.get("cumulative", {})
    user = cumulative.get("user_level")
    if user:
        lines += [
            "",
            f"user level (global), accountant {user['accountant']}, delta {user['delta']:.3g} "
            f"(n = {user['n']} clients), budget {_fmt(user['budget'])}",
            f"  epsilon vs server and participants (no amplification): {_fmt(user['epsilon'])}",
            "  epsilon amplified, valid only for observers of the released model: "
            f"{_fmt(user['epsilon_amplified_model_observers'])}",
        ]
        mechanism = document.get("user_level_mechanism") or {}
        if mechanism.get("noise") == "distributed":
            lines.append(
                f"  noise: distributed {mechanism['kind']} shares from every client, sigma "
                f"{mechanism['noise_multiplier']:.4f} x sensitivity {mechanism['sensitivity']:.6g}"
                f", up to {mechanism['colluding_clients']} colluding clients' shares discounted"
            )
        elif mechanism.get("noise") == "central":
            lines.append("  noise: central Gaussian, added by the (trusted) server")
    clients = cumulative.get("clients")
    if clients:
        lines += ["", "sample level (per client): client  n  delta  sigma  steps  epsilon"]
        for key, row in clients.items():
            lines.append(
                f"  {key:>6}  {row['n']}  {row['delta']:.3g}  {row['noise_multiplier']:.4f}  "
                f"{row['steps']}  {_fmt(row['epsilon'])}"
                + (f"  (budget {row['budget']})" if row["budget"] is not None else "")
            )
    lines += ["", "rounds:"]
    for row in document.get("rounds", []):
        parts = [f"  round {row['round']} (attempt {row['attempt']})"]
        if "user_level" in row:
            parts.append(f"user eps {_fmt(row['user_level']['epsilon'])}")
        if "clients" in row:
            eps = [c["epsilon"] for c in row["clients"].values()]
            if eps:
                parts.append(f"{len(eps)} clients trained, max client eps {max(eps):.4f}")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def print_ledger(run_dir: Path, *, raw: bool = False) -> int:
    document = load_ledger(run_dir)
    print(json.dumps(document, indent=1) if raw else format_ledger(document))
    return 0
