"""Plots of unit importance (a layers x units heatmap and per-layer distributions, one panel per module kind), of
forgetting over training (:func:`plot_training_history`, drawn by :class:`peft_cofi.monitor.ForgettingMonitor`) and
of input-subspace spectra (:func:`plot_subspace_spectrum`).

A module's *kind* is its name after the layer index (``model.layers.9.mlp.up_proj`` -> ``mlp.up_proj``); its layer
is that index. Scores are shown normalised as the mask sees them (:func:`peft_cofi.mask.normalize_importance`:
``tanh(|z| / sharpness)`` per module, in [0, 1]); already-normalised sets are shown as stored. Rendering uses
matplotlib's Agg canvas directly (no pyplot, no global backend change), so it works headless and in threads.

Example:
    >>> import torch, tempfile, os
    >>> imp = UnitImportance({f"model.layers.{i}.mlp.up_proj": torch.rand(16) for i in range(3)})
    >>> path = plot_importance_heatmap(imp, os.path.join(tempfile.mkdtemp(), "heatmap.png"))
    >>> path.suffix
    '.png'
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .importance import UnitImportance
from .mask import normalize_importance
from .subspace import InputSubspace

_LAYER_INDEX = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<kind>.+)$")


def module_kind(name: str) -> tuple[str, int | None]:
    """Split a module name into (kind, layer index); names without a numbered layer are their own kind.

    Example:
        >>> module_kind("model.layers.9.mlp.up_proj")
        ('mlp.up_proj', 9)
        >>> module_kind("lm_head")
        ('lm_head', None)
    """
    match = _LAYER_INDEX.match(name)
    if match is None:
        return name, None
    return match["kind"], int(match["idx"])


def normalized_by_kind(
    importance: UnitImportance, sharpness: float = 1.0, normalization: str = "abs"
) -> dict[str, list[tuple[int | None, torch.Tensor]]]:
    """Kind -> [(layer, normalised importance)] sorted by layer, kinds in first-seen order.

    Example:
        >>> imp = UnitImportance({"h.1.fc": torch.tensor([0.0, 1.0]), "h.0.fc": torch.tensor([2.0, 0.0])})
        >>> [(layer, [round(v, 2) for v in t.tolist()]) for layer, t in normalized_by_kind(imp)["fc"]]
        [(0, [0.76, 0.76]), (1, [0.76, 0.76])]
    """
    kinds: dict[str, list[tuple[int | None, torch.Tensor]]] = {}
    for name, scores in importance.scores.items():
        kind, layer = module_kind(name)
        values = scores.float() if importance.normalized else normalize_importance(scores, sharpness, normalization)
        kinds.setdefault(kind, []).append((layer, values))
    for rows in kinds.values():
        rows.sort(key=lambda row: -1 if row[0] is None else row[0])
    return kinds


def plot_importance_heatmap(
    importance: UnitImportance,
    path: str | os.PathLike[str],
    sharpness: float = 1.0,
    normalization: str = "abs",
    title: str | None = None,
) -> Path:
    """Save a PNG heatmap of normalised importance: one panel per module kind, layers as rows, units as columns.

    Example:
        plot_importance_heatmap(UnitImportance.load("importance.safetensors"), "importance.png")
        PosixPath('importance.png')
    """
    kinds = normalized_by_kind(importance, sharpness, normalization)
    figure = Figure(
        figsize=(11, 1.2 + sum(0.9 + 0.22 * len(rows) for rows in kinds.values())), dpi=110, layout="constrained"
    )
    axes = figure.subplots(len(kinds), 1, squeeze=False)[:, 0]
    image = None
    for ax, (kind, rows) in zip(axes, kinds.items(), strict=True):
        width = max(values.numel() for _, values in rows)
        matrix = torch.full((len(rows), width), math.nan)
        for i, (_, values) in enumerate(rows):
            matrix[i, : values.numel()] = values
        image = ax.imshow(matrix.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(rows)), [_layer_label(layer) for layer, _ in rows], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(f"{kind} ({width} units)", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel("unit (output row; head when pooled)", fontsize=8)
    figure.colorbar(image, ax=list(axes), fraction=0.025, pad=0.01, label="importance")
    figure.suptitle(title or _default_title(importance, sharpness), fontsize=10)
    return _save(figure, path)


def plot_importance_distributions(
    importance: UnitImportance,
    path: str | os.PathLike[str],
    sharpness: float = 1.0,
    normalization: str = "abs",
    title: str | None = None,
) -> Path:
    """Save a PNG of per-module distributions: per kind, a box plot of normalised importance for each layer
    (whiskers 5-95 %) and the share of units with importance above 0.9 (strongly protected).

    Example:
        plot_importance_distributions(UnitImportance.load("imp.safetensors"), "dist.png")
        PosixPath('dist.png')
    """
    kinds = normalized_by_kind(importance, sharpness, normalization)
    figure = Figure(figsize=(4.2 * len(kinds) + 1, 4.2), dpi=110, layout="constrained")
    axes = figure.subplots(1, len(kinds), squeeze=False)[0]
    for ax, (kind, rows) in zip(axes, kinds.items(), strict=True):
        labels = [_layer_label(layer) for layer, _ in rows]
        ax.boxplot([values.numpy() for _, values in rows], whis=(5, 95), showfliers=False, tick_labels=labels)
        share = ax.twinx()
        share.plot(range(1, len(rows) + 1), [float((v > 0.9).float().mean()) for _, v in rows], "r.-", lw=1)
        share.set_ylim(0, 1)
        share.set_ylabel("share > 0.9", color="r", fontsize=8)
        share.tick_params(axis="y", labelsize=7, colors="r")
        ax.set_ylim(0, 1)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("importance", fontsize=8)
        ax.tick_params(labelsize=7)
    figure.suptitle(title or _default_title(importance, sharpness), fontsize=10)
    return _save(figure, path)


def plot_training_history(
    history: Sequence[Mapping[str, float]], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Save a PNG of a forgetting monitor's history over training steps: versatility (ΔCE on general text, and KL to
    the base model on a second axis) and, where measured, speciality (held-out task loss).

    Example:
        >>> import tempfile, os
        >>> history = [{"step": 0, "ce_increase": 0.0, "kl": 0.0, "eval_loss": 3.0},
        ...            {"step": 10, "ce_increase": 0.02, "kl": 0.01, "eval_loss": 2.1}]
        >>> plot_training_history(history, os.path.join(tempfile.mkdtemp(), "monitor.png")).suffix
        '.png'
    """
    if not history:
        raise ValueError("the history is empty: nothing was measured, so there is nothing to plot.")
    missing = [key for key in ("step", "ce_increase", "kl") if any(key not in record for record in history)]
    if missing:
        raise ValueError(f"every history record needs 'step', 'ce_increase' and 'kl'; some lack {missing}.")
    steps = [record["step"] for record in history]
    special = [record for record in history if "eval_loss" in record]
    figure = Figure(figsize=(11 if special else 6, 4), dpi=110, layout="constrained")
    axes = figure.subplots(1, 2 if special else 1, squeeze=False)[0]
    ax = axes[0]
    ax.plot(steps, [record["ce_increase"] for record in history], "b.-", label="ΔCE (general text)")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("ΔCE = CE_tuned - CE_base (nats)", color="b")
    kl = ax.twinx()
    kl.plot(steps, [record["kl"] for record in history], "r.--", label="KL(base || tuned)")
    kl.set_ylabel("KL to the base model (nats/position)", color="r")
    lines = ax.get_lines()[:1] + kl.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    ax.set_title("versatility (lower is better)", fontsize=10)
    if special:
        axes[1].plot([r["step"] for r in special], [r["eval_loss"] for r in special], "g.-")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("held-out task loss")
        axes[1].set_title("speciality (lower is better)", fontsize=10)
    figure.suptitle(title or f"forgetting monitor: {len(history)} measurements", fontsize=11)
    return _save(figure, path)


def plot_subspace_spectrum(subspace: InputSubspace, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Save a PNG of an input subspace's spectra: per module kind, the general energy the first directions hold
    (against the fraction of input directions, a dot where the protected rank ends) and the spectrum they were
    ranked by (eigenvalues over the trace, or the general-over-task ratios of a contrastive subspace), one line per
    layer.

    Raises:
        ValueError: the subspace carries no curves (one built from bare bases has nothing to plot).

    Example:
        plot_subspace_spectrum(InputSubspace.load("subspace.safetensors"), "subspace.png")
        PosixPath('subspace.png')
    """
    if not subspace.curves:
        raise ValueError("the input subspace holds no energy curves (it was built from bare bases): nothing to plot.")
    kinds: dict[str, list[tuple[int | None, str]]] = {}
    for name in subspace.curves:
        kind, layer = module_kind(name)
        kinds.setdefault(kind, []).append((layer, name))
    contrast = subspace.metadata.get("kind") == "contrast"
    figure = Figure(figsize=(11, 0.6 + 3.2 * len(kinds)), dpi=110, layout="constrained")
    axes = figure.subplots(len(kinds), 2, squeeze=False)
    for (energy_ax, spectrum_ax), (kind, rows) in zip(axes, kinds.items(), strict=True):
        rows.sort(key=lambda row: -1 if row[0] is None else row[0])
        colours = colormaps["viridis"](torch.linspace(0, 0.9, len(rows)).tolist())
        for colour, (layer, name) in zip(colours, rows, strict=True):
            curve, k = subspace.curves[name], subspace.rank[name]
            share = torch.arange(1, curve.numel() + 1) / curve.numel()
            energy_ax.plot(share, curve, color=colour, lw=1, label=f"layer {_layer_label(layer)}")
            energy_ax.plot([k / curve.numel()], [float(curve[k - 1])], "o", color=colour, ms=4)
            if name in subspace.spectra:
                spectrum_ax.semilogy(share, subspace.spectra[name].clamp(min=1e-12), color=colour, lw=1)
        energy_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="fraction of input directions", ylabel="general energy")
        energy_ax.set_title(f"{kind}: energy held (dot: protected rank)", fontsize=9, loc="left")
        spectrum_ax.set_xlabel("fraction of input directions")
        spectrum_ax.set_ylabel("general / task (trace-normalised)" if contrast else "eigenvalue / trace")
        spectrum_ax.set_title(f"{kind}: spectrum", fontsize=9, loc="left")
        if contrast:
            spectrum_ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
        if len(rows) <= 12:
            energy_ax.legend(fontsize=7, loc="lower right")
        for ax in (energy_ax, spectrum_ax):
            ax.tick_params(labelsize=7)
    figure.suptitle(title or _subspace_title(subspace), fontsize=10)
    return _save(figure, path)


def _subspace_title(subspace: InputSubspace) -> str:
    meta = subspace.metadata
    chosen = f"rank {meta['rank']}" if meta.get("rank") else f"energy {meta.get('energy', '?')}"
    return f"{meta.get('kind', 'given')} input subspace, {chosen}, {subspace.tokens} general tokens"


def _layer_label(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def _default_title(importance: UnitImportance, sharpness: float) -> str:
    method = importance.metadata.get("method", "importance")
    shown = "normalised importance" if importance.normalized else f"tanh(|z| / {sharpness:g}) of raw scores"
    tokens = f", {importance.tokens} tokens" if importance.tokens else ""
    return f"{method}: {shown}{tokens}"


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; {str(path)!r} does not end in .png.")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")
    return path
