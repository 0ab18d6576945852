"""Make ``cofi`` a real peft method: a ``PeftType.COFI`` member plus ``register_peft_method``.

``PeftType`` is a closed ``str`` Enum and ``register_peft_method`` only accepts existing members, so the member is
added to the enum's internal tables first. A real member (not a plain string) keeps ``peft_type.value`` working in
transformers and peft. Both steps are idempotent: importing peft_cofi twice, or reloading it, changes nothing.
"""

from __future__ import annotations

from peft.utils import PeftType

METHOD_NAME = "cofi"
PREFIX = "cofi_"


def _ensure_peft_type_member() -> PeftType:
    key = METHOD_NAME.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    type.__setattr__(PeftType, key, member)
    return member


COFI_PEFT_TYPE = _ensure_peft_type_member()


def register() -> None:
    """Register CoFi with peft (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .checkpoint import install_io_hooks
    from .config import CoFiConfig
    from .hub import install_push_hook
    from .model import CoFiModel

    install_io_hooks()
    install_push_hook()

    if PEFT_TYPE_TO_TUNER_MAPPING.get(COFI_PEFT_TYPE) is CoFiModel:
        return
    if COFI_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        # A reloaded peft_cofi module: replace the stale classes instead of failing on the duplicate name.
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(COFI_PEFT_TYPE, None)
    register_peft_method(name=METHOD_NAME, config_cls=CoFiConfig, model_cls=CoFiModel, prefix=PREFIX)
