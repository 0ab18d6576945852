"""``CoFiConfig``: which modules of which layers train, and how unit importance masks their updates."""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, PeftType

from .diff_format import check_storage
from .importance import UnitImportance
from .mask import MASK_MODES, NORMALIZATIONS
from .subspace import InputSubspace, describe
from .windows import parse_window

METHOD_NAME = "cofi"  # peft's method name; the PeftType member is its upper case
PEFT_TYPE_NAME = METHOD_NAME.upper()
# Value of ``importance`` in a saved adapter config: the mask factors travel in the adapter weights file.
CHECKPOINT_IMPORTANCE = "checkpoint"
# Value of ``input_subspace`` in a saved adapter config: the projection is already in the stored D.
CHECKPOINT_SUBSPACE = "checkpoint"


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
        input_subspace: protected input directions per module: a path to a subspace file, an
            :class:`~peft_cofi.InputSubspace` (see :func:`~peft_cofi.compute_input_subspace`) or a dict of module
            name -> basis ``U`` (``in_features x k``, orthonormal columns). The adapter trains
            ``W = W0 + (s * D)(I - U U^T)``: its update is zero on ``span(U)``, so the module's output on inputs
            there cannot change. It must cover every trained module (bases of other modules are ignored). A saved
            adapter stores the projected ``D`` and records ``"checkpoint"`` (loading needs no subspace), with a
            description in ``input_subspace_source``.
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

    Loading checks that the base weights are those the diff was trained on; to apply a diff to other weights anyway,
    pass ``verify_base=False`` to the loading call (``PeftModel.from_pretrained``, ``load_adapter``), never via a
    config (a saved config cannot switch the check off).

    Example:
        >>> config = CoFiConfig(layers_to_transform="bottom2", mask_mode="update")
        >>> config.peft_type.value
        'COFI'
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to train: names matched exactly or as a dotted suffix, or a regex on the full name. "
            "Unset: the architecture's FFN input and output projections (e.g. up_proj and down_proj)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to train (names or a regex), even when target_modules match."}
    )
    layers_to_transform: list[int] | int | str | None = field(
        default=None,
        metadata={
            "help": "Which layers train: indices, a named depth window of the paper ('bottom2' = layers in "
            "[25%, 50%) of the depth) or a depth-fraction range '0.25:0.5'. Unset: all layers."
        },
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the model's layer list (e.g. 'layers', 'h'), when it is not found."}
    )
    importance: Any | None = field(
        default=None,
        metadata={
            "help": "Unit importance that sets the soft mask: a file, a UnitImportance, a dict or a list of those. "
            "None: no fine-level mask (every unit moves freely)."
        },
    )
    importance_source: str | None = field(
        default=None, metadata={"help": "Where the importance came from (filled in when the adapter is saved)."}
    )
    mask_mode: Literal["update", "grad"] = field(
        default="update",
        metadata={
            "help": "'update': W = W0 + s*D, so each row's step shrinks by its factor s under any optimizer. "
            "'grad': the paper's gradient scaling, which Adam undoes."
        },
    )
    mask_sharpness: float = field(
        default=1.0,
        metadata={"help": "t in importance = tanh(|z| / t); 1.0 is the paper, smaller protects more units harder."},
    )
    mask_normalization: Literal["abs", "positive"] = field(
        default="abs",
        metadata={"help": "'abs' protects units far from the mean either way (the paper); 'positive' only above."},
    )
    input_subspace: Any | None = field(
        default=None,
        metadata={
            "help": "Input directions the update must not act on: a subspace file, an InputSubspace or a dict of "
            "module -> basis U. Trains W = W0 + (s*D)(I - U U^T). None: no input-subspace protection."
        },
    )
    input_subspace_source: dict | None = field(
        default=None,
        metadata={
            "help": "What the adapter's input subspace was (source, kind, per-module rank and energy); filled in "
            "when the adapter is created."
        },
    )
    head_pooling: bool = field(
        default=True, metadata={"help": "Give all rows of an attention head one importance (grouped-query aware)."}
    )
    attention_modules: list[str] | None = field(
        default=None, metadata={"help": "Projections whose output rows are attention heads; unset: per architecture."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter, as in peft."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: start from a zero diff (the base model); False: random (tests)."}
    )
    storage: Literal["dense", "rows", "topk"] = field(
        default="dense",
        metadata={
            "help": "How save_pretrained stores the diff: 'dense' (exact), 'rows' (only rows that changed) or "
            "'topk' (the largest entries; lossy). Keep 'dense' for checkpoints you resume from."
        },
    )
    storage_density: float | None = field(
        default=None, metadata={"help": "Fraction of rows ('rows', optional) or entries ('topk', required) to keep."}
    )
    storage_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Dtype of the stored values; bfloat16/float16 halve the file."}
    )
    storage_tolerance: float = field(
        default=1e-3,
        metadata={"help": "'rows' without a density keeps rows whose change exceeds this times the largest change."},
    )
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Not supported by CoFi (it trains whole modules); must be None."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = (
                sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
            )
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        _check_names("layers_pattern", self.layers_pattern)
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
        self._check_subspace()
        self.check_storage()
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

    def check_storage(self) -> None:
        """Validate the storage fields (see :func:`peft_cofi.diff_format.check_storage`)."""
        check_storage(self.storage, self.storage_density, self.storage_dtype, self.storage_tolerance)

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

    def _check_subspace(self) -> None:
        source = self.input_subspace
        if source is None or source == CHECKPOINT_SUBSPACE:
            pass
        elif isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"input subspace file {str(source)!r} does not exist.")
        elif isinstance(source, Mapping) and not isinstance(source, InputSubspace):
            self.input_subspace = InputSubspace(source)  # checked now, with the module named
        elif not isinstance(source, InputSubspace):
            raise TypeError(
                "input_subspace must be a path to a subspace file, an InputSubspace, or a dict of module name -> "
                f"basis; got {type(source).__name__}."
            )
        if self.input_subspace_source is not None and not isinstance(self.input_subspace_source, dict):
            raise TypeError(
                f"input_subspace_source must be a dict (a description) or None; got {self.input_subspace_source!r}."
            )

    def to_dict(self) -> dict:
        """The JSON-able config: in-memory importance is replaced by ``"checkpoint"`` (the factors are saved with
        the weights) and its origin kept in ``importance_source``; likewise an input subspace (the saved ``D`` is
        projected) with its description in ``input_subspace_source``."""
        importance, subspace = self.importance, self.input_subspace
        out = {
            k: v
            for k, v in self.__dict__.items()
            if k in self.__dataclass_fields__ and k not in ("importance", "input_subspace")
        }
        out = {k: (list(v) if isinstance(v, (set, tuple)) else v) for k, v in out.items()}
        if importance is not None and importance != CHECKPOINT_IMPORTANCE:
            out["importance_source"] = _describe_sources(importance)
        out["importance"] = None if importance is None else CHECKPOINT_IMPORTANCE
        if subspace is not None and subspace != CHECKPOINT_SUBSPACE and self.input_subspace_source is None:
            # Filled in when the adapter is created; before that, what is known without reading a file.
            in_file = isinstance(subspace, (str, os.PathLike))
            out["input_subspace_source"] = {"source": str(subspace)} if in_file else describe(subspace)
        out["input_subspace"] = None if subspace is None else CHECKPOINT_SUBSPACE
        return out


def _check_names(field_name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, str):
        check_regex(field_name, value)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field_name}={value!r} must be a list of module names or a regex string.")


_REPEATS = (re._constants.MAX_REPEAT, re._constants.MIN_REPEAT, re._constants.POSSESSIVE_REPEAT)


def check_regex(field_name: str, pattern: str) -> None:
    """Refuse a regex that does not compile, or one with a nested unbounded quantifier such as ``(.*.*)*x``: peft
    matches it against every module name with Python's backtracking engine, where such patterns take exponential time
    (a saved config could hang loading for minutes).

    Example:
        >>> check_regex("target_modules", r".*\\.(up|down)_proj")
        >>> check_regex("target_modules", "(a+)+b")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: target_modules='(a+)+b' nests an unbounded quantifier inside another (e.g. '(a+)+'), ...
    """
    try:
        parsed = re._parser.parse(pattern)
    except re.error as error:
        raise ValueError(f"{field_name}={pattern!r} is not a valid regular expression: {error}.") from error

    def nested(items: Any, inside: bool) -> bool:
        for op, arg in items:
            if op in _REPEATS:
                unbounded = arg[1] == re._constants.MAXREPEAT
                if inside and unbounded:
                    return True
                if nested(arg[2], inside or unbounded):
                    return True
            elif op in (re._constants.SUBPATTERN, re._constants.ATOMIC_GROUP):
                if nested(arg[-1], inside):
                    return True
            elif op == re._constants.BRANCH and any(nested(branch, inside) for branch in arg[1]):
                return True
        return False

    if nested(parsed, False):
        raise ValueError(
            f"{field_name}={pattern!r} nests an unbounded quantifier inside another (e.g. '(a+)+'), which can make "
            "matching take exponential time; rewrite it without the nesting, or list the module names."
        )


def _describe_sources(importance: object) -> str:
    sources = importance if isinstance(importance, (list, tuple)) else [importance]
    return ", ".join(str(s) if isinstance(s, (str, os.PathLike)) else "in-memory" for s in sources)
