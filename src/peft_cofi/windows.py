"""Layer windows: the paper's named depth windows and depth-fraction ranges, resolved to layer indices.

A window ``[a, b)`` of an ``L``-layer model holds the layers ``i`` with ``a * L <= i < b * L``; for a 32-layer model
``bottom2`` is layers 8-15, the paper's pick. Pure functions, no peft.

Example:
    >>> resolve_layers("bottom2", 12)
    [3, 4, 5]
    >>> resolve_layers("0.5:1", 4)
    [2, 3]
"""

from __future__ import annotations

import math
import re

NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "bottom1": (0.0, 0.25),
    "bottom2": (0.25, 0.5),
    "middle": (0.5, 0.75),
    "top": (0.75, 1.0),
    "bottom-plus": (0.0, 0.5),
    "middle-plus": (0.25, 0.75),
    "top-plus": (0.5, 1.0),
}

_FRACTION_RANGE = re.compile(r"^\s*(?P<a>\d*\.?\d+)\s*:\s*(?P<b>\d*\.?\d+)\s*$")


def parse_window(spec: str) -> tuple[float, float]:
    """Return the depth-fraction bounds ``(a, b)`` of a named window or an ``"a:b"`` range.

    Raises:
        ValueError: naming the spec and the accepted forms.

    Example:
        >>> parse_window("middle-plus")
        (0.25, 0.75)
    """
    if spec in NAMED_WINDOWS:
        return NAMED_WINDOWS[spec]
    match = _FRACTION_RANGE.match(spec)
    if match:
        a, b = float(match["a"]), float(match["b"])
        if 0.0 <= a < b <= 1.0:
            return a, b
    raise ValueError(
        f"layers_to_transform={spec!r} is not a layer window; use one of {sorted(NAMED_WINDOWS)}, "
        "a depth-fraction range 'a:b' with 0 <= a < b <= 1 (e.g. '0.25:0.5'), or a list of layer indices."
    )


def window_layers(start: float, end: float, num_layers: int) -> list[int]:
    """The layers ``i`` of an ``L``-layer model with ``start * L <= i < end * L`` (the one home of this formula).

    Example:
        >>> window_layers(0.25, 0.5, 32)
        [8, 9, 10, 11, 12, 13, 14, 15]
    """
    # Tolerance so that e.g. 0.25 * 12 = 3.0000000000000004 still starts at layer 3.
    return list(range(math.ceil(start * num_layers - 1e-9), math.ceil(end * num_layers - 1e-9)))


def resolve_layers(spec: str | int | list[int], num_layers: int) -> list[int]:
    """Resolve a window spec, one index or a list of indices to a sorted list of layer indices.

    Raises:
        ValueError: if the window holds no layer or an index is outside ``[0, num_layers)``.

    Example:
        >>> resolve_layers("bottom2", 30)
        [8, 9, 10, 11, 12, 13, 14]
    """
    if num_layers <= 0:
        raise ValueError(f"cannot resolve layers of a model with {num_layers} layers.")
    if isinstance(spec, str):
        layers = window_layers(*parse_window(spec), num_layers)
        if not layers:
            raise ValueError(f"window {spec!r} holds no layer of a {num_layers}-layer model; widen it.")
        return layers
    indices = [spec] if isinstance(spec, int) else list(spec)
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"layer indices {bad} are outside the model's {num_layers} layers (valid: 0..{num_layers - 1})."
        )
    return sorted(set(indices))
