"""``report.html``: a self-contained page (inline SVG, no scripts, no network)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
            "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]  # fmt: skip


def line_chart(
    title: str, xs: Sequence[float], series: Mapping[str, Sequence[float]], *, y_label: str
) -> str:
    """An SVG line chart of one or more series over shared x values."""
    width, height, pad = 560, 260, 48
    values = [v for s in series.values() for v in s if np.isfinite(v)]
    if not xs or not values:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    span_x = (x1 - x0) or 1.0

    def px(x: float) -> float:
        return pad + (x - x0) / span_x * (width - 2 * pad)

    def py(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">'
        f"{html.escape(title)}</text>",
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
        f'<text x="{pad - 4}" y="{py(y1) + 4}" text-anchor="end" font-size="11">{y1:.3g}</text>',
        f'<text x="{pad - 4}" y="{py(y0) + 4}" text-anchor="end" font-size="11">{y0:.3g}</text>',
        f'<text x="{px(x0)}" y="{height - pad + 16}" text-anchor="middle" font-size="11">'
        f"{x0:g}</text>",
        f'<text x="{px(x1)}" y="{height - pad + 16}" text-anchor="middle" font-size="11">'
        f"{x1:g}</text>",
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle" font-size="11">round</text>',
        f'<text x="12" y="{height / 2}" font-size="11" transform="rotate(-90 12 {height / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>',
    ]
    for i, (name, ys) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if np.isfinite(y))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'
        )
        parts.append(
            f'<text x="{width - pad + 4}" y="{pad + 14 * i}" font-size="11" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def class_distribution_chart(counts: np.ndarray, *, max_clients: int = 50) -> str:
    """Stacked bars: per-client label counts (the experimenter's view)."""
    shown = counts[:max_clients]
    width, height, pad = 560, 260, 40
    bar = (width - 2 * pad) / max(len(shown), 1)
    top = max(int(shown.sum(axis=1).max()), 1) if shown.size else 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="client data distribution">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">'
        f"Client label distribution (first {len(shown)} of {len(counts)} clients)</text>",
    ]
    for i, row in enumerate(shown):
        y = height - pad
        for c, count in enumerate(row):
            h = count / top * (height - 2 * pad)
            if h > 0:
                parts.append(
                    f'<rect x="{pad + i * bar:.1f}" y="{y - h:.1f}" width="{max(bar - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="{_PALETTE[c % len(_PALETTE)]}"/>'
                )
            y -= h
    parts.append("</svg>")
    return "".join(parts)


def synthetic_samples_figure(
    x: np.ndarray, y: np.ndarray, *, per_class: int = 4, cell: int = 48
) -> str:
    """A grid of synthetic samples, one row per class: 2-D inputs as grey images (min-max
    scaled per sample), 1-D signals as polylines."""
    classes = sorted(int(c) for c in np.unique(y))
    if not classes:
        return ""
    width = 40 + per_class * (cell + 6)
    height = 20 + len(classes) * (cell + 6)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="synthetic samples per class">'
    ]
    for row, label in enumerate(classes):
        top = 14 + row * (cell + 6)
        parts.append(f'<text x="4" y="{top + cell / 2:.0f}" font-size="12">{label}</text>')
        for col, index in enumerate(np.flatnonzero(y == label)[:per_class]):
            left = 30 + col * (cell + 6)
            sample = np.asarray(x[index], dtype=np.float64).squeeze()
            lo, hi = float(sample.min()), float(sample.max())
            scaled = (sample - lo) / (hi - lo) if hi > lo else np.zeros_like(sample)
            if scaled.ndim == 2:
                h, w = scaled.shape
                for i in range(h):
                    for j in range(w):
                        grey = round(255 * float(scaled[i, j]))
                        parts.append(
                            f'<rect x="{left + j * cell / w:.1f}" y="{top + i * cell / h:.1f}" '
                            f'width="{cell / w + 0.2:.2f}" height="{cell / h + 0.2:.2f}" '
                            f'fill="rgb({grey},{grey},{grey})"/>'
                        )
            else:
                flat = scaled.reshape(-1)
                points = " ".join(
                    f"{left + k * cell / max(flat.size - 1, 1):.1f},{top + cell * (1 - v):.1f}"
                    for k, v in enumerate(flat)
                )
                parts.append(
                    f'<rect x="{left}" y="{top}" width="{cell}" height="{cell}" fill="#f6f6f6"/>'
                    f'<polyline points="{points}" fill="none" stroke="#06c"/>'
                )
    parts.append("</svg>")
    return "".join(parts)


def write_report(
    path: str | Path,
    *,
    config: dict[str, Any],
    history: list[dict[str, Any]],
    class_counts: np.ndarray,
    secure_randomness: bool,
    synthetic: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    rounds = [float(r["round"]) for r in history]
    acc = line_chart(
        "Test accuracy",
        rounds,
        {"accuracy": [float(r["accuracy"]) for r in history]},
        y_label="accuracy",
    )
    spread = {
        "client min": [float(r.get("client_accuracy", {}).get("min", np.nan)) for r in history],
        "client median": [
            float(r.get("client_accuracy", {}).get("median", np.nan)) for r in history
        ],
    }
    loss = line_chart(
        "Test loss", rounds, {"loss": [float(r["loss"]) for r in history]}, y_label="loss"
    )
    # several tasks (server.strategy): one accuracy line per task beside the mean
    task_names = list(history[-1].get("tasks", {})) if history else []
    if task_names:
        acc += line_chart(
            "Test accuracy per task",
            rounds,
            {
                name: [
                    float(r.get("tasks", {}).get(name, {}).get("accuracy", np.nan)) for r in history
                ]
                for name in task_names
            },
            y_label="accuracy",
        )
    warning = (
        ""
        if secure_randomness
        else '<p class="warn"><strong>INSECURE:</strong> this run used '
        "<code>security.randomness: seeded</code>. Keys, masks and noise are reproducible "
        "from the seed; use it for simulation and tests only.</p>"
    )
    final = history[-1] if history else {}
    protection = html.escape(str(config.get("aggregation", {}).get("protection", "?")))
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>secfl run: {
        html.escape(config.get("name", ""))
    }</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
.warn{{background:#fee;border:1px solid #c00;padding:.5em}} svg{{margin:.5em}}
pre{{background:#f6f6f6;padding:.5em;overflow:auto}}</style></head><body>
<h1>secfl run: {html.escape(config.get("name", ""))}</h1>{warning}
<p>Protection mode: <code>{protection}</code>. Rounds completed: {len(history)}.
Final test accuracy: {final.get("accuracy", float("nan")):.4f};
loss: {final.get("loss", float("nan")):.4f}.</p>
<div>{acc}{loss}</div>
<div>{
        line_chart(
            "Per-client accuracy of the global model (experimenter's view)",
            rounds,
            spread,
            y_label="accuracy",
        )
    }
{class_distribution_chart(class_counts)}</div>{_refinement_section(history, synthetic)}
<h2>Configuration</h2><pre>{html.escape(_yaml(config))}</pre>
</body></html>
"""
    Path(path).write_text(body, encoding="utf-8")


def _refinement_section(
    history: list[dict[str, Any]], synthetic: tuple[np.ndarray, np.ndarray] | None
) -> str:
    refined = [r for r in history if "refine" in r]
    if not refined and synthetic is None:
        return ""
    parts = ["<h2>Refinement</h2>"]
    ratios = [
        (float(r["round"]), float(r["refine"]["memorisation"]["ratio"]))
        for r in refined
        if "memorisation" in r["refine"]
    ]
    if ratios:
        parts.append(
            line_chart(
                "Memorisation check: synthetic / test median distance to training records "
                "(below 1 is a privacy regression)",
                [x for x, _ in ratios],
                {"ratio": [v for _, v in ratios]},
                y_label="ratio",
            )
        )
    if synthetic is not None:
        parts.append("<p>Synthetic samples of the last refined round, one row per class:</p>")
        parts.append(synthetic_samples_figure(*synthetic))
    return "".join(parts)


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
