"""``CoFiConfig``: which modules of which layers train, and how unit importance masks their updates."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from .diff_format import STORAGES, VALUE_DTYPES
from .importance import UnitImportance
from .mask import NORMALIZATIONS
from .windows import parse_window

MASK_MODES = ("update", "grad")
# Value of ``importance`` in a saved adapter config: the mask factors travel in the adapter weights file.
CHECKPOINT_IMPORTANCE = "checkpoint"


@dataclass
class CoFiConfig(PeftConfig):
    """Configuration of a CoFiTune adapter (coarse module/layer selection + fine soft mask).

    Args:
        target_modules: module names to train, with peft's semantics: a list matched exactly or as a dotted suffix,
            or a regex string matched against the full name. Unset: the FFN input and output projections of the
            architecture (``up_proj``/``down_proj`` for Llama-like models; see ``DEFAULT_TARGET_MODULES``).
        exclude_modules: module names (list or regex) never to train.
        layers_to_transform: layer indices (list or int), a named window of the paper (``bottom1``, ``bottom2``,
            ``middle``, ``top``, ``bottom-plus``, ``middle-plus``, ``top-plus``), or a depth-fraction range such
            as ``"0.25:0.5"``. Windows are resolved against the model's depth when the adapter is created and the
            saved config records the explicit indices.
        layers_pattern: the name of the layer list (e.g. ``"layers"``, ``"h"``), as in peft.
        importance: raw unit importance: a path to an importance file, a :class:`UnitImportance`, a dict of module
            name -> scores, or a list of those (combined by element-wise max after normalisation). ``None``: no
            fine-level mask (coarse selection only). A saved adapter records ``"checkpoint"``: its mask factors
            are stored with its weights, and the original source in ``importance_source``.
        mask_mode: ``"update"`` (default) reparametrises ``W = W0 + s * D`` with trainable ``D`` and per-row
            factor ``s = 1 - importance``, so each row's change is scaled by ``s`` under any optimizer.
            ``"grad"`` is the paper's: gradient rows are multiplied by ``s``; under Adam this is nearly a no-op
            because Adam normalises each element's step (see the README's measurement).
        mask_sharpness: ``t`` in ``importance = tanh(|z| / t)``; 1.0 is the paper, smaller protects more units
            more strongly.
        mask_normalization: ``"abs"`` (the paper's ``|z|``) or ``"positive"`` (only above-average units protected).
        head_pooling: pool importance per attention head for the projections in ``attention_modules``
            (grouped-query aware).
        attention_modules: module names whose output units are attention heads; unset: per-architecture default
            (``q_proj``, ``k_proj``, ``v_proj``, GPT-2's ``c_attn``, ...).
        modules_to_save: extra modules trained in full and saved, as in peft.
        init_weights: ``True`` starts from a zero diff (outputs equal the base model); ``False`` a random one
            (for tests).
        storage: how ``save_pretrained`` stores each module's diff (docs/FORMAT.md): ``"dense"`` (exact),
            ``"rows"`` (only rows whose change exceeds ``storage_tolerance`` x the largest row change, or the
            ``storage_density`` fraction of rows that changed most) or ``"topk"`` (the ``storage_density``
            fraction of largest-magnitude entries). Sparse storage is lossy: keep ``"dense"`` for checkpoints you
            resume training from, and re-save sparse at the end (``peft_cofi.save_diff``).
        storage_density: kept fraction in (0, 1] for ``"topk"`` (required) and optionally ``"rows"``.
        storage_dtype: value dtype on disk: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        storage_tolerance: relative row-norm threshold of ``"rows"`` storage without a density.
        verify_base: refuse to load a diff onto base weights whose fingerprints differ from those it was saved
            with. Set ``False`` (e.g. ``PeftModel.from_pretrained(base, path, config=config)``) to apply it anyway.

    Example:
        >>> config = CoFiConfig(layers_to_transform="bottom2", mask_mode="update")
        >>> config.peft_type.value
        'COFI'
    """

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to train."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to skip."})
    layers_to_transform: list[int] | int | str | None = field(
        default=None, metadata={"help": "Layer indices, a named window (e.g. 'bottom2') or a range '0.25:0.5'."}
    )
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Layer list name."})
    importance: Any | None = field(default=None, metadata={"help": "Unit importance source(s)."})
    importance_source: str | None = field(default=None, metadata={"help": "Provenance of the importance."})
    mask_mode: Literal["update", "grad"] = field(default="update", metadata={"help": "'update' or 'grad'."})
    mask_sharpness: float = field(default=1.0, metadata={"help": "t in tanh(|z| / t); 1.0 is the paper."})
    mask_normalization: Literal["abs", "positive"] = field(default="abs", metadata={"help": "'abs' or 'positive'."})
    head_pooling: bool = field(default=True, metadata={"help": "Pool attention importance per head."})
    attention_modules: list[str] | None = field(default=None, metadata={"help": "Projections with head units."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})
    init_weights: bool = field(default=True, metadata={"help": "False gives a random non-identity adapter."})
    storage: Literal["dense", "rows", "topk"] = field(default="dense", metadata={"help": "Diff storage mode."})
    storage_density: float | None = field(default=None, metadata={"help": "Kept fraction for sparse storage."})
    storage_dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "dtype."})
    storage_tolerance: float = field(default=1e-3, metadata={"help": "Row threshold of 'rows' storage."})
    verify_base: bool = field(default=True, metadata={"help": "Check base-weight fingerprints on load."})
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unsupported; must be None."})

    def __post_init__(self) -> None:
        super().__post_init__()
        from ._registration import COFI_PEFT_TYPE

        self.peft_type = COFI_PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = (
                sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
            )
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={self.mask_mode!r} is not supported; use one of {MASK_MODES}.")
        if self.mask_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"mask_normalization={self.mask_normalization!r} is not supported; use one of {NORMALIZATIONS}."
            )
        sharpness = self.mask_sharpness
        if (
            isinstance(sharpness, bool)
            or not isinstance(sharpness, (int, float))
            or not (math.isfinite(sharpness) and sharpness > 0)
        ):
            raise ValueError(f"mask_sharpness={sharpness!r} must be a finite number > 0 (1.0 is the paper's).")
        self._check_layers()
        self._check_importance()
        self._check_storage()
        if self.target_parameters is not None:
            raise ValueError("CoFi trains whole modules; target_parameters is not supported, use target_modules.")

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if isinstance(layers, str):
            parse_window(layers)
        elif isinstance(layers, (list, tuple)):
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(
                    f"layers_to_transform={layers!r} must be a non-empty list of layer indices >= 0, an index, "
                    "a named window such as 'bottom2', or a depth-fraction range such as '0.25:0.5'."
                )
            self.layers_to_transform = list(layers)
        elif layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
            raise ValueError(f"layers_to_transform={layers!r} must be a list of indices, an index >= 0 or a window.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform; set both or neither.")

    def _check_storage(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"storage={self.storage!r} is not supported; use one of {STORAGES}.")
        if self.storage_dtype not in VALUE_DTYPES:
            raise ValueError(
                f"storage_dtype={self.storage_dtype!r} is not supported; use one of {sorted(VALUE_DTYPES)}."
            )
        density = self.storage_density
        if density is not None and (
            isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1
        ):
            raise ValueError(f"storage_density={density!r} must be a fraction in (0, 1], e.g. 0.1.")
        if self.storage == "topk" and density is None:
            raise ValueError("storage='topk' needs storage_density, the fraction of entries to keep (e.g. 0.1).")
        if not (isinstance(self.storage_tolerance, (int, float)) and 0 <= self.storage_tolerance < 1):
            raise ValueError(f"storage_tolerance={self.storage_tolerance!r} must be in [0, 1).")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` atomically (temporary file + rename), so a failed save leaves the old one."""
        os.makedirs(save_directory, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(prefix=".cofi-config-", dir=save_directory)
        try:
            super().save_pretrained(tmp_dir, **kwargs)
            os.replace(os.path.join(tmp_dir, CONFIG_NAME), os.path.join(save_directory, CONFIG_NAME))
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def _check_importance(self) -> None:
        if self.importance is None or self.importance == CHECKPOINT_IMPORTANCE:
            return
        sources = self.importance if isinstance(self.importance, (list, tuple)) else [self.importance]
        if not sources:
            raise ValueError("importance=[] holds no importance set; pass None for no fine-level mask.")
        for source in sources:
            if isinstance(source, (str, os.PathLike)):
                if not os.path.isfile(source):
                    raise FileNotFoundError(f"importance file {str(source)!r} does not exist.")
            elif not isinstance(source, (UnitImportance, Mapping)):
                raise TypeError(
                    "importance must be a path to an importance file, a UnitImportance, a dict of module name -> "
                    f"scores, or a list of those; got {type(source).__name__}."
                )

    def to_dict(self) -> dict:
        """The JSON-able config: in-memory importance is replaced by ``"checkpoint"`` (the factors are saved with
        the weights) and its origin kept in ``importance_source``."""
        importance = self.importance
        out = {k: v for k, v in self.__dict__.items() if k in self.__dataclass_fields__ and k != "importance"}
        out = {k: (list(v) if isinstance(v, (set, tuple)) else v) for k, v in out.items()}
        if importance is not None and importance != CHECKPOINT_IMPORTANCE:
            out["importance_source"] = _describe_sources(importance)
        out["importance"] = None if importance is None else CHECKPOINT_IMPORTANCE
        return out


def _check_names(field_name: str, value: object) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field_name}={value!r} must be a list of module names or a regex string.")


def _describe_sources(importance: object) -> str:
    sources = importance if isinstance(importance, (list, tuple)) else [importance]
    return ", ".join(str(s) if isinstance(s, (str, os.PathLike)) else "in-memory" for s in sources)
