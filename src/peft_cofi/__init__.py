"""peft-cofi: CoFiTune (coarse-to-fine fine-tuning that keeps versatility) as a Hugging Face peft method.

Importing this package registers the ``cofi`` method with peft, so the usual peft entry points work:

Example:
    >>> import peft_cofi
    >>> from peft import PeftType
    >>> PeftType.COFI.value
    'COFI'
"""

from . import patches
from ._version import __version__
from .anchor import attach_retention_anchor
from .checkpoint import save_diff
from .config import CoFiConfig
from .diff_format import CheckpointError, read_diff_file
from .export import export_lora, merge_into_base
from .hub import push_to_hub
from .importance import UnitImportance
from .layer import CoFiLayer
from .model import CoFiModel
from .monitor import ForgettingMonitor
from .scoring import compute_importance

__all__ = [
    "CheckpointError",
    "CoFiConfig",
    "CoFiLayer",
    "CoFiModel",
    "ForgettingMonitor",
    "UnitImportance",
    "__version__",
    "attach_retention_anchor",
    "compute_importance",
    "export_lora",
    "merge_into_base",
    "push_to_hub",
    "read_diff_file",
    "save_diff",
]

patches.install()
