"""secfl: privacy-hardened federated learning.

``secfl.load_config(path)`` and ``secfl.run(config, out_dir)`` are the embedding API; the
building blocks (``secfl.data``, ``secfl.models``, ``secfl.server``, ...) import on their own.
"""

from secfl.config import RunConfig, config_from_dict, load_config
from secfl.errors import SecflError
from secfl.runner import RunResult, run

__version__ = "0.1.0"

__all__ = [
    "RunConfig",
    "RunResult",
    "SecflError",
    "__version__",
    "config_from_dict",
    "load_config",
    "run",
]
