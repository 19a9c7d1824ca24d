"""trainbus-mlflow: trainbus training runs logged to MLflow, as an installable plugin.

Installed, it registers the entry point ``mlflow`` in the group ``trainbus.plugins``, so
every ``Trainer(plugins="auto")`` logs its training runs to MLflow; see
:class:`MlflowCallback` for what is logged, when and where.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from trainbus_mlflow.callback import (
    ARTIFACTS_DIR,
    DATABASE_FILE,
    ENV_EXPERIMENT,
    ENV_TRACKING_URI,
    MlflowCallback,
    default_tracking_uri,
    weights_directories,
)
from trainbus_mlflow.tracker import MlflowTrackingWarning

TRAINBUS_PLUGIN_API = 1
"""The trainbus plugin API this package is written for."""

try:
    __version__ = _version("trainbus-mlflow")
except PackageNotFoundError:  # imported from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "ARTIFACTS_DIR",
    "DATABASE_FILE",
    "ENV_EXPERIMENT",
    "ENV_TRACKING_URI",
    "MlflowCallback",
    "MlflowTrackingWarning",
    "TRAINBUS_PLUGIN_API",
    "__version__",
    "default_tracking_uri",
    "weights_directories",
]
