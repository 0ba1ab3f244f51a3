"""Model zoo (GroupNorm only, so DP-SGD can wrap every model)."""

from secfl.models.zoo import MLP, SmallCNN, build_model

__all__ = ["MLP", "SmallCNN", "build_model"]
