"""Encoding of updates: flatten (here), quantize and pack (masking, CKKS)."""

from secfl.encode.flatten import (
    ParameterLayout,
    check_update,
    flatten_parameters,
    load_parameters,
    model_hash,
)

__all__ = ["ParameterLayout", "check_update", "flatten_parameters", "load_parameters", "model_hash"]
