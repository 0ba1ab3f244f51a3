"""The client role: local training and the client side of every protocol."""

from secfl.client.app import ClientApp
from secfl.client.trainer import LocalResult, evaluate, train_locally

__all__ = ["ClientApp", "LocalResult", "evaluate", "train_locally"]
