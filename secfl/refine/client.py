"""Client-side inversion (US12236370B2): a client inverts the broadcast global model into
synthetic samples of every class and trains on its own records plus those.

Under label skew a client's local steps erase what the global model knows about classes the
client lacks; samples the global model assigns to those classes, trained with their target
labels, hold that knowledge in place (FedGen's motivation, without a generator). Inverting
the global model costs no privacy: it is what the server released. The feature statistics
the inversion matches (``feature_stats`` > 0) are those of the client's own records under the
global model, computed on the device and never sent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from secfl.config import RefineClientInversionConfig
from secfl.data.datasets import Dataset
from secfl.encode.flatten import load_parameters
from secfl.messages import FitIns
from secfl.randomness import Randomness
from secfl.refine.inversion import InversionSettings, SyntheticSet, invert
from secfl.refine.moments import ActivationMoments


class ClientAugmenter:
    """``ClientApp.augment``: the records a client trains on this round."""

    def __init__(
        self,
        data: Dataset,
        config: RefineClientInversionConfig,
        *,
        model_factory: Callable[[], nn.Module],
        input_shape: tuple[int, ...],
        randomness: Randomness,
        party: str,
        shared_tuning: bool = False,
    ) -> None:
        self._data = data
        self._config = config
        self._model = model_factory()
        self._input_shape = input_shape
        self._randomness = randomness
        self._party = party
        self._settings = InversionSettings.of(config, shared_tuning=shared_tuning)
        self.last: SyntheticSet | None = None

    def __call__(self, ins: FitIns) -> Dataset:
        load_parameters(self._model, np.array(ins.weights, dtype=np.float32))
        # the statistics of the client's own records (the inputs' scale for the starting
        # point; matched only when feature_stats > 0) never leave the client
        moments = ActivationMoments.of_data(self._model, self._data.x)
        synthetic = invert(
            [self._model],
            input_shape=self._input_shape,
            classes=range(self._data.num_classes),
            settings=self._settings,
            stream=self._randomness.stream(
                "refine.client_inversion_init",
                round_index=ins.round,
                attempt=ins.attempt,
                party=self._party,
            ),
            moments=moments,
        )
        self.last = synthetic
        return Dataset(
            f"{self._data.name}+synthetic",
            np.concatenate([self._data.x, synthetic.x]),
            np.concatenate([self._data.y, synthetic.y.astype(self._data.y.dtype)]),
            self._data.num_classes,
        )
