"""Input subspaces: the object, its file format, and how a config's ``input_subspace`` is resolved and recorded.

An :class:`InputSubspace` maps module names (as ``base_model.named_modules()`` reports them) to a protected basis
``U``: ``in_features x k`` float32 with orthonormal columns, ``1 <= k < in_features``. ``CoFiConfig(input_subspace=
...)`` trains ``W = W0 + (s * D)(I - U U^T)``; :func:`peft_cofi.compute_input_subspace` computes one.

File format (safetensors, tensors only, never pickle):

- ``basis/<module>``: ``U``, float32 ``(in_features, k)``;
- optionally ``curve/<module>``: float32 ``(in_features,)``, the general energy fraction captured by the first ``j``
  directions of the module's full ordering (what ``energy`` chose ``k`` from);
- optionally ``spectrum/<module>``: float32 ``(in_features,)``, descending: the eigenvalues over the trace (plain) or
  the general-over-task ratios (contrastive);
- header metadata (strings): ``format = "peft-cofi-subspace"``, ``format_version = "1"``, ``tokens`` and any
  provenance the producer adds (``kind``, ``energy``, ``rank``, ``task_tokens``, ``model``, ...).

Example:
    >>> import torch, tempfile, os
    >>> subspace = InputSubspace({"model.layers.0.mlp.up_proj": torch.eye(4)[:, :1]}, tokens=12, kind="plain")
    >>> path = os.path.join(tempfile.mkdtemp(), "subspace.safetensors")
    >>> subspace.save(path)
    >>> loaded = InputSubspace.load(path)
    >>> loaded.tokens, loaded.rank
    (12, {'model.layers.0.mlp.up_proj': 1})
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping

import torch
from safetensors.torch import save_file

from .importance import strip_wrapper_prefix
from .subspace_math import check_basis
from .tensor_files import read_tagged_file

FORMAT_NAME = "peft-cofi-subspace"
FORMAT_VERSION = "1"
_SECTIONS = ("basis", "curve", "spectrum")


class InputSubspace(Mapping[str, torch.Tensor]):
    """Protected input directions per module, with their energy curves and provenance.

    Args:
        bases: module name -> ``U`` (``in_features x k``, orthonormal columns, ``1 <= k < in_features``).
        curves: module name -> cumulative general energy fraction per direction (optional; gives :attr:`energy`).
        spectra: module name -> the spectrum the directions were ranked by (optional; for plots).
        tokens: how many general tokens the second moments were accumulated over (0 when unknown).
        **metadata: string-able provenance (``kind``, ``energy``, ``rank``, ``model``, ...).

    Raises:
        ValueError: a basis that is not finite, not orthonormal, of rank 0 or of full rank (the module is named);
            a curve or spectrum of the wrong length, or one without a basis.

    Example:
        >>> subspace = InputSubspace({"fc": torch.eye(3)[:, :2]}, curves={"fc": torch.tensor([0.5, 0.75, 1.0])})
        >>> subspace["fc"].shape, subspace.energy
        (torch.Size([3, 2]), {'fc': 0.75})
    """

    def __init__(
        self,
        bases: Mapping[str, torch.Tensor],
        *,
        curves: Mapping[str, torch.Tensor] | None = None,
        spectra: Mapping[str, torch.Tensor] | None = None,
        tokens: int = 0,
        **metadata: object,
    ) -> None:
        clean: dict[str, torch.Tensor] = {}
        for name, basis in bases.items():
            try:
                clean[strip_wrapper_prefix(name)] = check_basis(torch.as_tensor(basis))
            except ValueError as error:
                raise ValueError(f"input subspace of module {name!r}: {error}") from error
        if not clean:
            raise ValueError("an input subspace needs a basis for at least one module.")
        self.bases = clean
        self.curves = self._vectors("curve", curves or {})
        self.spectra = self._vectors("spectrum", spectra or {})
        bad = [n for n, c in self.curves.items() if ((c < -1e-6) | (c > 1 + 1e-6)).any() or (c.diff() < -1e-6).any()]
        if bad:
            raise ValueError(f"energy curves must rise from 0 to 1; those of {bad[:5]} do not.")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens={tokens!r} must be a number of tokens >= 0.")
        self.tokens = tokens
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def _vectors(self, what: str, vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, vector in vectors.items():
            name = strip_wrapper_prefix(name)
            tensor = torch.as_tensor(vector).detach().to("cpu", torch.float32).contiguous()
            if name not in self.bases:
                raise ValueError(f"input subspace: a {what} for module {name!r}, which has no basis.")
            if tensor.shape != (self.bases[name].shape[0],) or not torch.isfinite(tensor).all():
                raise ValueError(
                    f"input subspace of module {name!r}: its {what} must hold {self.bases[name].shape[0]} finite "
                    f"values (one per input direction); got shape {tuple(tensor.shape)}."
                )
            out[name] = tensor
        return out

    def __getitem__(self, module_name: str) -> torch.Tensor:
        return self.bases[module_name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.bases)

    def __len__(self) -> int:
        return len(self.bases)

    def __eq__(self, other: object) -> bool:
        """Bit-identical tensors, tokens and metadata (Mapping's own ``==`` would compare tensors ambiguously)."""
        if not isinstance(other, InputSubspace):
            return NotImplemented
        same = (self.tokens, self.metadata) == (other.tokens, other.metadata)
        return same and all(
            mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
            for mine, theirs in ((self.bases, other.bases), (self.curves, other.curves), (self.spectra, other.spectra))
        )

    __hash__ = None  # mutable, like a dict

    @property
    def rank(self) -> dict[str, int]:
        """Module -> how many directions are protected."""
        return {name: int(basis.shape[1]) for name, basis in self.bases.items()}

    @property
    def energy(self) -> dict[str, float]:
        """Module -> fraction of the general inputs' energy the protected span holds (NaN without a curve)."""
        return {
            name: float(self.curves[name][basis.shape[1] - 1]) if name in self.curves else math.nan
            for name, basis in self.bases.items()
        }

    def __repr__(self) -> str:
        ranks = sorted(self.rank.values())
        return (
            f"InputSubspace({len(self)} modules, rank {ranks[0]}-{ranks[-1]}, tokens={self.tokens}, "
            f"metadata={self.metadata})"
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write bases, curves, spectra and metadata to a safetensors file (format in the module docstring)."""
        tensors = {f"basis/{n}": b for n, b in self.bases.items()}
        tensors |= {f"curve/{n}": c for n, c in self.curves.items()}
        tensors |= {f"spectrum/{n}": s for n, s in self.spectra.items()}
        metadata = {**self.metadata, "format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        metadata["tokens"] = str(self.tokens)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> InputSubspace:
        """Read and validate a file written by :meth:`save`.

        Raises:
            FileNotFoundError: the path does not exist.
            ValueError: not a peft-cofi subspace file, an unknown version, an unknown tensor, or a bad basis.
        """
        tensors, metadata = read_tagged_file(path, FORMAT_NAME, FORMAT_VERSION, "subspace")
        sections: dict[str, dict[str, torch.Tensor]] = {section: {} for section in _SECTIONS}
        for key, tensor in tensors.items():
            section, _, name = key.partition("/")
            if section not in sections or not name:
                raise ValueError(f"{str(path)!r} holds a tensor {key!r} that is not part of a subspace file.")
            sections[section][name] = tensor
        try:
            tokens = int(metadata.pop("tokens", "0"))
        except ValueError as error:
            raise ValueError(f"{str(path)!r} has a bad token count in its header: {error}") from error
        try:
            return cls(
                sections["basis"], curves=sections["curve"], spectra=sections["spectrum"], tokens=tokens, **metadata
            )
        except ValueError as error:
            raise ValueError(f"{str(path)!r}: {error}") from error


def as_subspace(source: object) -> InputSubspace:
    """A path, a mapping of bases or an :class:`InputSubspace` as an :class:`InputSubspace`.

    Example:
        >>> as_subspace({"fc": torch.eye(2)[:, :1]}).rank
        {'fc': 1}
    """
    if isinstance(source, InputSubspace):
        return source
    if isinstance(source, (str, os.PathLike)):
        return InputSubspace.load(source)
    if isinstance(source, Mapping):
        return InputSubspace(source)
    raise TypeError(
        "input_subspace must be a path to a subspace file, an InputSubspace, or a dict of module name -> basis; "
        f"got {type(source).__name__}."
    )


def select_bases(source: object, in_features: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The basis of every trained module (``in_features``: module -> its input width), checked against it.

    Raises:
        ValueError: the subspace misses trained modules, or a basis does not fit its module (named, with values).

    Example:
        >>> select_bases({"fc": torch.eye(4)[:, :1], "other": torch.eye(2)[:, :1]}, {"fc": 4})["fc"].shape
        torch.Size([4, 1])
    """
    subspace = as_subspace(source)
    missing = [name for name in in_features if name not in subspace]
    if missing:
        raise ValueError(
            f"the input subspace does not cover {len(missing)} trained module(s), e.g. {missing[:5]} (it has "
            f"{list(subspace)[:3]}...); compute it for the same target_modules and layers (compute_input_subspace "
            "does so when given the same config)."
        )
    out = {}
    for name, width in in_features.items():
        try:
            out[name] = check_basis(subspace[name], width)
        except ValueError as error:
            raise ValueError(f"input subspace of module {name!r}: {error}") from error
    return out


def describe(source: object, modules: Mapping[str, torch.Tensor] | None = None) -> dict:
    """What a saved adapter records about the subspace it was trained with (``input_subspace_source`` in its
    config and ``cofi_input_subspace`` in its header): where it came from, how it was chosen, and per trained module
    the protected rank and energy.

    Example:
        >>> describe({"fc": torch.eye(3)[:, :1]})["modules"]
        {'fc': {'rank': 1, 'energy': None}}
    """
    subspace = as_subspace(source)
    energy = subspace.energy
    names = list(subspace) if modules is None else list(modules)
    meta = subspace.metadata
    return {
        "source": str(source) if isinstance(source, (str, os.PathLike)) else "in-memory",
        "kind": meta.get("kind", "given"),
        "energy": _number(meta.get("energy")),
        "rank": _number(meta.get("rank")),
        "tokens": subspace.tokens,
        "modules": {
            name: {
                "rank": int(subspace[name].shape[1]),
                "energy": None if math.isnan(energy[name]) else round(energy[name], 6),
            }
            for name in names
        },
    }


def _number(text: str | None) -> float | int | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and "." not in text else value
