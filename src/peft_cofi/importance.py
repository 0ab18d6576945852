"""Unit importance: the object and its file format.

An importance set holds, per module, one raw (un-normalised) score per output unit: a 1-D float tensor of length
``out_features`` (or one score per head for attention projections). Keys are module names as
``base_model.named_modules()`` reports them, e.g. ``"model.layers.9.mlp.up_proj"``.

File format (safetensors, tensors only, never pickle):

- one float32 tensor per module, named by the module name;
- header metadata (strings): ``format = "peft-cofi-importance"``, ``format_version = "1"``, ``tokens`` (how many
  tokens the scores were accumulated over), ``normalized`` (``"true"`` when the tensors already hold importances
  in [0, 1], as :meth:`UnitImportance.combine` produces), ``method`` and any other provenance the producer adds.

Example:
    >>> import torch, tempfile, os
    >>> imp = UnitImportance({"model.layers.0.mlp.up_proj": torch.rand(8)}, tokens=128, method="kl-dropout")
    >>> path = os.path.join(tempfile.mkdtemp(), "importance.safetensors")
    >>> imp.save(path)
    >>> UnitImportance.load(path).tokens
    128
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import save_file

from .diff_format import PEFT_PREFIX
from .mask import combine_importance, normalize_importance
from .tensor_files import read_tagged_file

FORMAT_NAME = "peft-cofi-importance"
FORMAT_VERSION = "1"


class UnitImportance:
    """Raw per-unit importance scores of some modules, with provenance.

    Args:
        scores: module name -> 1-D tensor of raw scores (one per output unit, or per head).
        tokens: number of tokens the scores were accumulated over (0 when unknown).
        normalized: the tensors already hold normalised importances in [0, 1] rather than raw scores.
        **metadata: extra string-able provenance (``method``, ``model``, ``data`` ...).

    Example:
        >>> imp = UnitImportance({"fc": torch.tensor([0.1, 0.5])})
        >>> imp["fc"].tolist()
        [0.10000000149011612, 0.5]
    """

    def __init__(
        self, scores: Mapping[str, torch.Tensor], tokens: int = 0, normalized: bool = False, **metadata: object
    ) -> None:
        clean: dict[str, torch.Tensor] = {}
        for name, value in scores.items():
            tensor = torch.as_tensor(value).detach().to("cpu", torch.float32)
            if tensor.dim() != 1 or tensor.numel() == 0:
                raise ValueError(
                    f"importance for {name!r} must be a non-empty 1-D tensor (one score per unit); "
                    f"got shape {tuple(tensor.shape)}."
                )
            clean[strip_wrapper_prefix(name)] = tensor.contiguous()
        if not clean:
            raise ValueError("an importance set needs scores for at least one module.")
        self.scores = clean
        self.tokens = int(tokens)
        self.normalized = bool(normalized)
        if self.normalized and any(((t < 0) | (t > 1) | t.isnan()).any() for t in clean.values()):
            raise ValueError("normalized importance must lie in [0, 1]; pass raw scores with normalized=False.")
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def __getitem__(self, module_name: str) -> torch.Tensor:
        return self.scores[module_name]

    def __contains__(self, module_name: object) -> bool:
        return module_name in self.scores

    def __repr__(self) -> str:
        kind = "normalized" if self.normalized else "raw"
        return f"UnitImportance({len(self.scores)} modules, {kind}, tokens={self.tokens}, metadata={self.metadata})"

    @classmethod
    def combine(
        cls, sets: Sequence[UnitImportance], sharpness: float = 1.0, normalization: str = "abs"
    ) -> UnitImportance:
        """Normalise each set per module and take the element-wise max (e.g. importance from several data sets).

        The result holds normalised importances (``normalized=True``) for the modules present in every set. Scores
        are normalised as stored: store per-head scores for head-pooled attention projections.

        Example:
            >>> a = UnitImportance({"fc": torch.tensor([0.0, 0.0, 1.0, 0.0])})
            >>> b = UnitImportance({"fc": torch.tensor([1.0, 0.0, 0.0, 0.0])})
            >>> combined = UnitImportance.combine([a, b])
            >>> bool(combined["fc"][0] == combined["fc"][2] > combined["fc"][1])
            True
        """
        if not sets:
            raise ValueError("combine needs at least one importance set.")
        common = [name for name in sets[0].scores if all(name in s for s in sets[1:])]
        if not common:
            raise ValueError("the importance sets share no module; combine sets computed for the same modules.")
        scores = {}
        for name in common:
            try:
                scores[name] = combine_importance(
                    [s[name] if s.normalized else normalize_importance(s[name], sharpness, normalization) for s in sets]
                )
            except ValueError as error:
                raise ValueError(f"cannot combine importance of module {name!r}: {error}") from error
        return cls(
            scores,
            tokens=sum(s.tokens for s in sets),
            normalized=True,
            combined_from=len(sets),
            sharpness=sharpness,
            normalization=normalization,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores and metadata to a safetensors file (see the module docstring for the format)."""
        metadata = {
            **self.metadata,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tokens": str(self.tokens),
            "normalized": "true" if self.normalized else "false",
        }
        save_file(self.scores, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> UnitImportance:
        """Read an importance file written by :meth:`save`.

        Raises:
            FileNotFoundError: the path does not exist.
            ValueError: the file is not a peft-cofi importance file, or has an unsupported version.
        """
        scores, metadata = read_tagged_file(path, FORMAT_NAME, FORMAT_VERSION, "importance")
        tokens = int(metadata.pop("tokens", 0))
        normalized = metadata.pop("normalized", "false") == "true"
        return cls(scores, tokens=tokens, normalized=normalized, **metadata)


def as_importance(source: object) -> UnitImportance:
    """Turn a path, a mapping of scores or a :class:`UnitImportance` into a :class:`UnitImportance`.

    Example:
        >>> as_importance({"fc": torch.ones(3)}).tokens
        0
    """
    if isinstance(source, UnitImportance):
        return source
    if isinstance(source, (str, os.PathLike)):
        return UnitImportance.load(source)
    if isinstance(source, Mapping):
        return UnitImportance(source)
    raise TypeError(
        f"importance must be a path to an importance file, a UnitImportance, or a dict of module name -> scores; "
        f"got {type(source).__name__}."
    )


def strip_wrapper_prefix(name: str) -> str:
    """A module name as the bare model knows it, without a peft wrapper's ``base_model.model.`` prefix.

    Example:
        >>> strip_wrapper_prefix("base_model.model.model.layers.0.mlp.up_proj")
        'model.layers.0.mlp.up_proj'
    """
    return name.removeprefix(PEFT_PREFIX)
