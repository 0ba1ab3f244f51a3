"""The run directory: resolved config, metrics, events, model, report, checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.torch import save_file
from torch import nn

from secfl.errors import RunDirectoryError
from secfl.record.checkpoint import CHECKPOINT_NAME

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"
EVENTS_NAME = "events.jsonl"
MODEL_NAME = "model.safetensors"
REPORT_NAME = "report.html"
CLIENT_DATA_NAME = "client_data.json"


def prepare_new_run_dir(path: str | Path) -> Path:
    """Create ``path`` for a new run; refuse one that already holds a run."""
    folder = Path(path)
    for name in (CHECKPOINT_NAME, EVENTS_NAME, METRICS_NAME):
        if (folder / name).exists():
            raise RunDirectoryError(
                f"{folder} already holds a run ({name} exists); resume it with "
                f"--resume {folder} or choose a new --out"
            )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json_atomic(path: Path, document: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1, default=_plain) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_config(folder: Path, resolved: dict[str, Any]) -> None:
    (folder / CONFIG_NAME).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    write_json_atomic(folder / METRICS_NAME, {"rounds": history})


def write_model(folder: Path, model: nn.Module, *, metadata: dict[str, str]) -> Path:
    path = folder / MODEL_NAME
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
