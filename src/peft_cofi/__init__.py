"""peft-cofi: CoFiTune (coarse-to-fine fine-tuning that keeps versatility) as a Hugging Face peft method.

Importing this package registers the ``cofi`` method with peft, so the usual peft entry points work:

Example:
    >>> import peft_cofi
    >>> from peft import PeftType
    >>> PeftType.COFI.value
    'COFI'
"""

from ._registration import COFI_PEFT_TYPE, register
from .config import CoFiConfig
from .importance import UnitImportance
from .layer import CoFiLayer
from .model import CoFiModel

__version__ = "0.1.0"
__all__ = ["COFI_PEFT_TYPE", "CoFiConfig", "CoFiLayer", "CoFiModel", "UnitImportance", "__version__"]

register()
