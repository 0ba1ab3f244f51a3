"""``attack_report.json`` and ``attack_report.html`` (DESIGN 7b).

The JSON holds ``checks`` (``{"name", "metric", "value", "op", "threshold", "passed"}``, one per
guarantee of the threat model that applies to the configuration's mode), ``passed`` (all
checks), the threat model and configuration it judged, and every attack's details. The
HTML page is self-contained (inline SVG, no scripts, no network): the checks, ROC curves of
the membership attacks, the canary score histograms of the DP audit, and reconstructed
records beside the originals.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secfl.record.rundir import write_json_atomic

REPORT_JSON = "attack_report.json"
REPORT_HTML = "attack_report.html"
_COLOURS = ("#4e79a7", "#e15759", "#59a14f", "#f28e2b")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def write_json(folder: Path, document: Mapping[str, Any]) -> Path:
    path = folder / REPORT_JSON
    write_json_atomic(path, _json_safe(dict(document)))
    return path


# ---------------------------------------------------------------------------- SVG pieces


def image_svg(pixels: np.ndarray, *, bounds: tuple[float, float], cell: int = 10) -> str:
    """A grey-scale image (2-D; other shapes are drawn as one row) as SVG rectangles."""
    array = np.asarray(pixels, np.float64)
    if array.ndim >= 2:
        array = array.reshape(array.shape[-2], array.shape[-1])
    else:
        array = array.reshape(1, -1)
    if array.shape[0] == 1 and array.shape[1] > 32:  # a long signal: wrap it
        width = 32
        padded = np.full(math.ceil(array.size / width) * width, bounds[0])
        padded[: array.size] = array.ravel()
        array = padded.reshape(-1, width)
    low, high = bounds
    span = (high - low) or 1.0
    rows, cols = int(array.shape[0]), int(array.shape[1])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * cell}" '
             f'height="{rows * cell}">']  # fmt: skip
    for r in range(rows):
        for c in range(cols):
            level = int(255 * (1.0 - np.clip((array[r, c] - low) / span, 0.0, 1.0)))
            parts.append(
                f'<rect x="{c * cell}" y="{r * cell}" width="{cell}" height="{cell}" '
                f'fill="rgb({level},{level},{level})"/>'
            )
    parts.append("</svg>")
    return "".join(parts)


def curve_svg(
    title: str,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    x_label: str,
    y_label: str,
    diagonal: bool = False,
) -> str:
    """Line chart of (x, y) curves on [0, 1] x [0, 1]."""
    width, height, pad = 360, 300, 44
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">'
        f"{html.escape(title)}</text>",
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
        'fill="none" stroke="#333"/>',
        f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle" font-size="11">'
        f"{html.escape(x_label)}</text>",
        f'<text x="12" y="{height / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {height / 2})">{html.escape(y_label)}</text>',
    ]

    def px(x: float) -> float:
        return pad + x * (width - 2 * pad)

    def py(y: float) -> float:
        return height - pad - y * (height - 2 * pad)

    if diagonal:
        parts.append(
            f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="#bbb" '
            'stroke-dasharray="4"/>'
        )
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'
        )
        parts.append(
            f'<text x="{pad + 8}" y="{pad + 16 + 14 * i}" font-size="11" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def roc_points(
    scores: np.ndarray, member: np.ndarray, points: int = 200
) -> tuple[list[float], list[float]]:
    """(FPR, TPR) of the threshold test at ``points`` score quantiles."""
    scores = np.asarray(scores, np.float64)
    member = np.asarray(member, bool)
    thresholds = np.unique(np.quantile(scores, np.linspace(0, 1, points)))[::-1]
    fpr = [0.0] + [float(np.mean(scores[~member] > t)) for t in thresholds] + [1.0]
    tpr = [0.0] + [float(np.mean(scores[member] > t)) for t in thresholds] + [1.0]
    return fpr, tpr


def histogram_svg(title: str, groups: Mapping[str, np.ndarray], *, bins: int = 40) -> str:
    """Overlaid histograms (shares per bin) of the named score groups."""
    width, height, pad = 360, 240, 36
    values = np.concatenate([np.asarray(v, np.float64) for v in groups.values() if len(v)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return f"<p>{html.escape(title)}: no data</p>"
    low, high = np.quantile(values, [0.001, 0.999])
    if high <= low:
        high = low + 1.0
    edges = np.linspace(low, high, bins + 1)
    shares = {
        name: np.histogram(np.clip(v, low, high), edges)[0] / max(len(v), 1)
        for name, v in groups.items()
    }
    top = max(float(s.max()) for s in shares.values()) or 1.0
    bar = (width - 2 * pad) / bins
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">'
        f"{html.escape(title)}</text>",
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#333"/>',
        f'<text x="{pad}" y="{height - pad + 14}" font-size="10">{low:.3g}</text>',
        f'<text x="{width - pad}" y="{height - pad + 14}" font-size="10" text-anchor="end">'
        f"{high:.3g}</text>",
    ]
    for i, (name, share) in enumerate(shares.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        for b, s in enumerate(share):
            h = (height - 2 * pad) * float(s) / top
            parts.append(
                f'<rect x="{pad + b * bar:.1f}" y="{height - pad - h:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{colour}" fill-opacity="0.5"/>'
            )
        parts.append(
            f'<text x="{pad + 8}" y="{pad + 14 * i}" font-size="11" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- the page


def _checks_table(checks: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for c in checks:
        colour = "#d4edda" if c["passed"] else "#f8d7da"
        value = c["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))
        rows.append(
            f'<tr style="background:{colour}"><td>{html.escape(c["name"])}</td>'
            f"<td><code>{html.escape(c['metric'])}</code></td><td>{shown}</td>"
            f"<td>{html.escape(c['op'])} {c['threshold']:.4g}</td>"
            f"<td>{'PASS' if c['passed'] else 'FAIL'}</td></tr>"
        )
    return (
        "<table><tr><th>check</th><th>metric</th><th>value</th><th>threshold</th>"
        "<th>result</th></tr>" + "".join(rows) + "</table>"
    )


def write_html(
    folder: Path,
    document: Mapping[str, Any],
    *,
    figures: Sequence[tuple[str, str]],
    images: Sequence[tuple[str, list[tuple[np.ndarray, np.ndarray, str, float]]]],
    bounds: tuple[float, float],
) -> Path:
    """The report page: summary, checks, then each figure (title, SVG) and the
    reconstructions (per probe: original beside its reconstruction, with its PSNR)."""
    checks = document["checks"]
    passed = sum(1 for c in checks if c["passed"])
    verdict = (
        "every check passed" if document["passed"] else f"{len(checks) - passed} check(s) FAILED"
    )
    body = [
        "<!doctype html><html><head><meta charset='utf-8'><title>secfl attack report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        ".fig{display:inline-block;margin:6px;vertical-align:top}"
        ".pair{display:inline-block;margin:4px;text-align:center;font-size:11px}</style>",
        "</head><body>",
        "<h1>secfl attack report</h1>",
        f"<p>Threat model <b>{html.escape(str(document['threat_model']))}</b>, configuration "
        f"<b>{html.escape(str(document['config']['name']))}</b> (protection "
        f"<code>{html.escape(str(document['config']['protection']))}</code>): "
        f"<b>{html.escape(verdict)}</b> ({passed} of {len(checks)} passed).</p>",
    ]
    for note in document.get("notes", []):
        body.append(f"<p><i>{html.escape(str(note))}</i></p>")
    body.append("<h2>Checks</h2>")
    body.append(_checks_table(checks))
    if figures:
        body.append("<h2>Plots</h2>")
        body += [f'<div class="fig">{svg}</div>' for _, svg in figures]
    if images:
        body.append("<h2>Reconstructions (original left, reconstruction right)</h2>")
        for probe, pairs in images:
            body.append(f"<h3>{html.escape(probe)}</h3>")
            for truth, rebuilt, attack, score in pairs:
                body.append(
                    f'<div class="pair">{image_svg(truth, bounds=bounds)} '
                    f"{image_svg(rebuilt, bounds=bounds)}<br>{html.escape(attack)} "
                    f"{score:.1f} dB</div>"
                )
    body.append("<h2>Details</h2><pre>")
    details = {k: v for k, v in document.items() if k not in ("checks",)}
    body.append(html.escape(json.dumps(_json_safe(details), indent=1)[:200_000]))
    body.append("</pre></body></html>")
    path = folder / REPORT_HTML
    path.write_text("\n".join(body), encoding="utf-8")
    return path
