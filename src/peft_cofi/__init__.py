"""peft-cofi: CoFiTune (coarse-to-fine fine-tuning that keeps versatility) as a Hugging Face peft method.

Importing this package registers the ``cofi`` method with peft, so the usual peft entry points work:

Example:
    >>> import peft_cofi
    >>> from peft import PeftType
    >>> PeftType.COFI.value
    'COFI'
"""

import importlib
from typing import Any

from . import patches
from ._version import __version__
from .checkpoint import save_diff
from .config import CoFiConfig
from .diff_format import CheckpointError, read_diff_file
from .diff_scaling import scale_diff
from .export import export_lora, merge_into_base
from .hub import push_to_hub
from .importance import UnitImportance
from .layer import CoFiLayer
from .model import CoFiModel
from .scoring import compute_importance
from .subspace import InputSubspace
from .subspace_compute import compute_input_subspace

# The Trainer callbacks load on first use: they import transformers' trainer modules, and the autoload registers
# CoFi while transformers may still be importing those (``from transformers import Trainer`` imports peft halfway).
_LAZY = {"attach_retention_anchor": "anchor", "ForgettingMonitor": "monitor"}
# calibrate pulls in matplotlib (its report plot): loaded on first use, so importing peft stays light.
_LAZY["calibrate"] = "calibration"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "CoFiConfig",
    "CoFiLayer",
    "CoFiModel",
    "ForgettingMonitor",
    "InputSubspace",
    "UnitImportance",
    "__version__",
    "attach_retention_anchor",
    "calibrate",
    "compute_importance",
    "compute_input_subspace",
    "export_lora",
    "merge_into_base",
    "push_to_hub",
    "read_diff_file",
    "save_diff",
    "scale_diff",
]

patches.install()
