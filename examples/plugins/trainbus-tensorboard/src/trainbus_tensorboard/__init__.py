"""trainbus-tensorboard: TensorBoard event files for trainbus runs, as an installable plugin.

Installed, it registers the entry point ``tensorboard`` in the group ``trainbus.plugins``, so
every ``Trainer(plugins="auto")`` writes ``<maps>/tensorboard/events.out.tfevents.*``; see
:class:`TensorBoardCallback` for what is written and when.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from trainbus_tensorboard.callback import (
    DEFAULT_EVERY,
    ENV_EVERY,
    LOG_DIR,
    TensorBoardCallback,
    every_from_environment,
)

TRAINBUS_PLUGIN_API = 1
"""The trainbus plugin API this package is written for."""

try:
    __version__ = _version("trainbus-tensorboard")
except PackageNotFoundError:  # imported from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_EVERY",
    "ENV_EVERY",
    "LOG_DIR",
    "TRAINBUS_PLUGIN_API",
    "TensorBoardCallback",
    "__version__",
    "every_from_environment",
]
