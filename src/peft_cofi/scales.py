"""Pure scale math for calibrating a trained diff after the fact: no peft model, no I/O.

A calibrated adapter is ``W0 + f ⊙ ΔW`` with one factor per output row of each module (``f = α`` everywhere is
WiSE-FT's global interpolation). Multiplying the trained state ``D`` row-wise by ``f`` multiplies the weight diff
:func:`peft_cofi.mask.masked_diff` by ``f`` in both mask modes (``s ⊙ (f ⊙ D) = f ⊙ (s ⊙ D)``), so the mask and the
base fingerprint stay as they are.

- :func:`expand_scales` turns a user's ``scales`` spec (a number, or a mapping from module name, dotted suffix,
  glob or layer index to a number or a row vector) into one factor vector per module;
- :func:`scale_groups` and :func:`group_factors` define the coordinates a calibration search moves (one global
  factor, one per layer, per module, or per group of rows) and expand a point of that space to factor vectors;
- :func:`sparsify_delta` is DARE / TIES sparsification of one module's diff with rescaling, through
  ``peft.utils.merge_utils`` (with a single task tensor TIES's sign election keeps every sign, so it is magnitude
  pruning times ``alpha``; DARE drops entries at random and rescales the kept ones by ``1 / density``).

Example:
    >>> rows = {"model.layers.0.mlp.up_proj": 2, "model.layers.1.mlp.up_proj": 2}
    >>> {name: f.tolist() for name, f in expand_scales({"*": 0.5, 1: 0.0}, rows).items()}
    {'model.layers.0.mlp.up_proj': [0.5, 0.5], 'model.layers.1.mlp.up_proj': [0.0, 0.0]}
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft.utils.merge_utils import dare_linear, ties

from .mask import delta_from_diff, masked_diff

# A scales spec: one factor for every module, or a mapping applied in order (later entries override earlier ones).
ScaleValue = float | Sequence[float] | torch.Tensor
Scales = float | Mapping[str | int, ScaleValue]
GRANULARITIES = ("global", "layer", "module", "row")
SPARSIFY_METHODS = ("dare", "ties")
_GLOB_CHARS = re.compile(r"[*?\[]")
_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The layer a module belongs to: the first numbered part of its name (``None`` outside the layer stack).

    Example:
        >>> layer_index("model.layers.12.mlp.up_proj"), layer_index("lm_head")
        (12, None)
    """
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _matches(key: str | int, name: str) -> bool:
    """Whether a scales key selects module ``name``: a layer index (an int or a string of digits), a glob on the
    full name (``*``, ``?``, ``[...]``), or a name matched exactly or as a dotted suffix (``mlp.up_proj``)."""
    if isinstance(key, int) or key.isdigit():
        return layer_index(name) == int(key)
    if _GLOB_CHARS.search(key):
        return fnmatch.fnmatchcase(name, key)
    return name == key or name.endswith("." + key)


def _factor_vector(value: Any, rows: int, where: str) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{where}: a scale must be a number or a row vector, not {value!r}.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{where}: the scale {value!r} is not a finite number.")
        return torch.full((rows,), float(value))
    try:
        vector = torch.as_tensor(value, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{where}: a scale must be a number or a row vector; got {type(value).__name__}.") from error
    if vector.numel() != rows:
        raise ValueError(f"{where}: a row vector of {vector.numel()} factors does not fit the module's {rows} rows.")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{where}: the row vector holds NaN or inf factors.")
    return vector


def expand_scales(scales: Scales, rows: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """One float32 factor per output row for every module of ``rows`` (module name -> number of rows).

    ``scales`` is a number (every row of every module), or a mapping whose entries are applied in order, each
    setting the factor of the modules its key selects (later entries override earlier ones; unselected modules keep
    1.0). A key is a layer index (``3`` or ``"3"``), a glob on the full module name (``"*.up_proj"``,
    ``"model.layers.1[0-4].*"``), or a module name matched exactly or as a dotted suffix (``"mlp.down_proj"``). A
    value is a number or a vector with one factor per row of every module it selects.

    Raises:
        ValueError: a key that selects no module (a typo would silently scale nothing), a non-finite factor, or a
            row vector of the wrong length.
        TypeError: a spec or value of another type.

    Example:
        >>> rows = {"model.layers.0.mlp.up_proj": 3, "model.layers.0.mlp.down_proj": 2}
        >>> expand_scales({"up_proj": [1.0, 0.5, 0.0]}, rows)["model.layers.0.mlp.up_proj"].tolist()
        [1.0, 0.5, 0.0]
        >>> expand_scales({"mlp.gate_proj": 0.5}, rows)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: scales key 'mlp.gate_proj' selects no module of the adapter; its modules are e.g. [...
    """
    if isinstance(scales, bool):
        raise TypeError(f"scales must be a number or a mapping, not {scales!r}.")
    if isinstance(scales, (int, float)):
        return {name: _factor_vector(scales, n, "scales") for name, n in rows.items()}
    if not isinstance(scales, Mapping):
        raise TypeError(
            "scales must be a number or a mapping from module name, glob or layer index to a number or a row vector; "
            f"got {type(scales).__name__}."
        )
    out = {name: torch.ones(n) for name, n in rows.items()}
    for key, value in scales.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise TypeError(f"scales key {key!r} must be a module name, a glob or a layer index.")
        selected = [name for name in rows if _matches(key, name)]
        if not selected:
            raise ValueError(
                f"scales key {key!r} selects no module of the adapter; its modules are e.g. {list(rows)[:3]} (keys: "
                "layer indices, globs such as '*.up_proj', or names / dotted suffixes)."
            )
        for name in selected:
            out[name] = _factor_vector(value, rows[name], f"scales[{key!r}] for {name}")
    return out


def describe_scales(scales: Scales) -> Any:
    """A JSON-able record of a scales spec: numbers as they are, row vectors of up to 16 factors in full, longer
    ones summarised (``rows``, ``mean``, ``min``, ``max``).

    Example:
        >>> describe_scales({"*": 0.5, 3: [1.0, 0.0]})
        {'*': 0.5, '3': [1.0, 0.0]}
    """
    if isinstance(scales, (int, float)) and not isinstance(scales, bool):
        return float(scales)
    return {str(key): _describe_value(value) for key, value in dict(scales).items()}


def _describe_value(value: ScaleValue) -> Any:
    if isinstance(value, (int, float)):
        return float(value)
    vector = torch.as_tensor(value, dtype=torch.float32).flatten()
    if vector.numel() <= 16:
        return [float(v) for v in vector]
    return summarize_vector(vector)


def summarize_vector(vector: torch.Tensor) -> float | dict[str, float]:
    """One number when every factor is equal, else ``{"rows", "mean", "min", "max"}``.

    Example:
        >>> summarize_vector(torch.tensor([0.5, 0.5])), summarize_vector(torch.tensor([0.0, 1.0]))["mean"]
        (0.5, 0.5)
    """
    vector = vector.float().flatten()
    if vector.numel() and bool((vector == vector[0]).all()):
        return float(vector[0])
    return {
        "rows": vector.numel(),
        "mean": float(vector.mean()),
        "min": float(vector.min()),
        "max": float(vector.max()),
    }


# A group of rows a search moves together: (module, row indices or None for all rows) pairs.
Group = list[tuple[str, torch.Tensor | None]]


def scale_groups(row_norms: Mapping[str, torch.Tensor], granularity: str, row_groups: int = 4) -> dict[str, Group]:
    """The coordinates of a calibration search, in model order: group name -> its (module, rows) members.

    ``row_norms`` maps each module to the norms of its diff's rows (their order is the row order). Granularities:
    ``"global"`` (one group), ``"layer"`` (one per layer index; modules outside the layer stack form ``"other"``),
    ``"module"`` (one per module), ``"row"`` (per module, ``row_groups`` groups of rows by how much they changed:
    ``#q0`` holds the rows with the largest diff norms, the last group the smallest; a module with fewer rows than
    groups gets one group per row).

    Example:
        >>> norms = {"m.0.up": torch.tensor([3.0, 1.0, 2.0, 0.0]), "m.1.up": torch.ones(4)}
        >>> list(scale_groups(norms, "layer"))
        ['layer 0', 'layer 1']
        >>> [rows.tolist() for _, rows in scale_groups(norms, "row", 2)["m.0.up#q0"]]
        [[0, 2]]
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not supported; use one of {GRANULARITIES}.")
    if isinstance(row_groups, bool) or not isinstance(row_groups, int) or row_groups < 1:
        raise ValueError(f"row_groups={row_groups!r} must be a positive integer (e.g. 4).")
    if granularity == "global":
        return {"all": [(name, None) for name in row_norms]}
    if granularity == "module":
        return {name: [(name, None)] for name in row_norms}
    if granularity == "layer":
        groups: dict[str, Group] = {}
        for name in row_norms:
            index = layer_index(name)
            groups.setdefault("other" if index is None else f"layer {index}", []).append((name, None))
        return groups
    groups = {}
    for name, norms in row_norms.items():
        order = torch.sort(norms.float(), descending=True, stable=True).indices
        for part, rows in enumerate(torch.tensor_split(order, min(row_groups, norms.numel()))):
            groups[f"{name}#q{part}"] = [(name, rows.sort().values)]
    return groups


def group_factors(
    groups: Mapping[str, Group], values: Mapping[str, float], rows: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Per-row factor vectors of every module in ``rows`` for one point of the search space (group -> factor;
    rows in no group, or in a group without a value, keep 1.0).

    Example:
        >>> groups = {"layer 0": [("m.0.up", None)], "layer 1": [("m.1.up", None)]}
        >>> group_factors(groups, {"layer 1": 0.25}, {"m.0.up": 2, "m.1.up": 2})["m.1.up"].tolist()
        [0.25, 0.25]
    """
    out = {name: torch.ones(n) for name, n in rows.items()}
    for group, value in values.items():
        for name, row_index in groups[group]:
            if row_index is None:
                out[name].fill_(float(value))
            else:
                out[name][row_index] = float(value)
    return out


def module_seed(seed: int, name: str) -> int:
    """A per-module random seed derived from a run's seed and the module name (stable across processes).

    Example:
        >>> module_seed(0, "a") == module_seed(0, "a") != module_seed(1, "a")
        True
    """
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def check_density(density: float) -> float:
    """Validate a sparsification density: the fraction of diff entries kept, in (0, 1).

    Example:
        >>> check_density(1.0)
        Traceback (most recent call last):
        ...
        ValueError: density=1.0 must be a fraction in (0, 1): the share of diff entries DARE / TIES keep (e.g. 0.2).
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density < 1:
        raise ValueError(
            f"density={density!r} must be a fraction in (0, 1): the share of diff entries DARE / TIES keep (e.g. 0.2)."
        )
    return float(density)


def sparsify_delta(
    delta: torch.Tensor,
    mask: torch.Tensor,
    mask_mode: str,
    method: str,
    density: float,
    alpha: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """One module's trained state ``D`` after DARE or TIES sparsification of its diff, times ``alpha``.

    The diff (:func:`~peft_cofi.mask.masked_diff`) is sparsified with ``peft.utils.merge_utils`` as a single task
    tensor: ``"dare"`` keeps each entry with probability ``density`` and divides the kept ones by it
    (``dare_linear``; the random draw is seeded by ``seed`` on the CPU and leaves the global generator as it was),
    ``"ties"`` keeps the ``density`` fraction of largest magnitudes (``ties``; one task tensor elects its own signs).
    The result is converted back to ``D`` (:func:`~peft_cofi.mask.delta_from_diff`), float32 on the CPU.

    Example:
        >>> d = torch.tensor([[4.0, -1.0], [0.5, -3.0]])
        >>> sparsify_delta(d, torch.ones(2), "update", "ties", density=0.5).tolist()
        [[4.0, 0.0], [0.0, -3.0]]
    """
    if method not in SPARSIFY_METHODS:
        raise ValueError(f"method={method!r} is not a sparsification; use one of {SPARSIFY_METHODS}.")
    density = check_density(density)
    mask = mask.detach().to("cpu", torch.float32)
    diff = masked_diff(delta.detach().to("cpu", torch.float32), mask, mask_mode)
    weights = torch.tensor([float(alpha)])
    if method == "ties":
        pruned = ties([diff], weights, density)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pruned = dare_linear([diff], weights, density)
    return delta_from_diff(pruned, mask, mask_mode)
