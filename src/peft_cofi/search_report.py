"""Search outputs: the best ``CoFiConfig`` as JSON, a markdown report of all trials, a scatter plot.

Files written by :func:`write_search_outputs` into ``out_dir``:

- ``best_config.json``: ``CoFiConfig`` keyword arguments: ``CoFiConfig(**json.load(f))`` rebuilds the config;
- ``best_adapter/adapter_config.json``: the same config as peft writes it: ``CoFiConfig.from_pretrained(dir)``;
- ``report.md``: settings, stop reason, the per-level log, the best node, the Pareto front and a table of trials;
- ``trials.png``: speciality vs versatility of every trial, the front joined and ringed, the best starred, the
  base model as a cross, the retention threshold dashed (matplotlib's Agg canvas; no pyplot, no backend change);
- ``result.json``: :meth:`SearchResult.to_dict`.

Example:
    paths = write_search_outputs(result, "search-out")
    sorted(paths)
    ['adapter_config', 'best_config', 'plot', 'report', 'result']
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .config import CoFiConfig

if TYPE_CHECKING:  # search.py imports this module to write its outputs
    from .search import SearchResult

# Fields never copied into best_config.json: set by peft, or (importance, subspace) not reproducible from JSON.
_SKIPPED_FIELDS = (
    "peft_type",
    "peft_version",
    "auto_mapping",
    "importance",
    "importance_source",
    "input_subspace",
    "input_subspace_source",
)
# tab20: its ten dark colours, then the ten light ones, so up to 20 module groups get distinct colours.
_COLOURS = (*colormaps["tab20"].colors[0::2], *colormaps["tab20"].colors[1::2])


def best_config_kwargs(result: SearchResult) -> dict[str, Any]:
    """The best node's ``CoFiConfig`` arguments: its modules and layers plus the template's non-default fields.

    An importance in the template is left out (pass it again when building the adapter); the report says so.

    Example:
        best_config_kwargs(result)
        {'target_modules': ['down_proj', 'up_proj'], 'layers_to_transform': [8, 9, 10, 11, 12, 13, 14]}
    """
    config = result.best_config()
    defaults = CoFiConfig().to_dict()
    values = config.to_dict()
    out = {k: values[k] for k in ("target_modules", "layers_to_transform")}
    for name, value in values.items():
        if name not in out and name not in _SKIPPED_FIELDS and value != defaults.get(name):
            out[name] = value.value if hasattr(value, "value") else value
    return out


def write_search_outputs(result: SearchResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the files of the module docstring (the config files only when some trial succeeded).

    Example:
        write_search_outputs(result, "out")["report"].name
        'report.md'
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.md", "plot": out / "trials.png", "result": out / "result.json"}
    if result.best is not None:
        kwargs = best_config_kwargs(result)
        paths["best_config"] = out / "best_config.json"
        paths["best_config"].write_text(json.dumps(kwargs, indent=2) + "\n", encoding="utf-8")
        CoFiConfig(**kwargs).save_pretrained(out / "best_adapter")
        paths["adapter_config"] = out / "best_adapter" / "adapter_config.json"
    paths["report"].write_text(search_markdown(result), encoding="utf-8")
    plot_search(result, paths["plot"])
    paths["result"].write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n", encoding="utf-8")
    return paths


def search_markdown(result: SearchResult) -> str:
    """The markdown report of a search.

    Example:
        print(search_markdown(result))
    """
    settings = result.settings
    best = result.best
    front = {id(t) for t in result.front}
    lines = [
        "# Module search",
        "",
        f"- model: {settings.get('model_type')} with {settings.get('num_layers')} layers",
        f"- objective: {result.objective.describe()}",
        f"- strategy: {result.strategy}; trial = {settings.get('steps')} AdamW steps at lr {settings.get('lr')}, "
        f"seed {settings.get('seed')}",
        f"- evaluators: speciality `{settings.get('speciality')}`, versatility `{settings.get('versatility')}`",
        f"- budget: {settings.get('budget_trials') or 'no'} trials, {settings.get('budget_minutes') or 'no'} minutes",
        f"- trials: {len(result.trials)} ({result.ran} run, {result.cached} from the cache, {len(result.failed)} "
        f"failed) in {result.seconds:.1f} s",
        f"- stopped: {result.stop_reason}",
        "",
    ]
    if result.reference is not None and result.reference.ok:
        ref = result.reference
        lines += [f"Base model: speciality {ref.speciality:.4f}, versatility {ref.versatility:.4f}.", ""]
    if best is None:
        lines += ["**No trial succeeded.**", ""]
    else:
        feasible = "" if result.objective.feasible(best) else " (**below the versatility threshold**)"
        lines += [
            f"**Best: `{best.label}`**{feasible}: speciality {best.speciality:.4f}, versatility "
            f"{best.versatility:.4f}; modules {best.modules}, layers {best.layers}.",
            "",
            "```json",
            json.dumps(best_config_kwargs(result)),
            "```",
            "",
        ]
        if result.template is not None and result.template.importance is not None:
            lines += ["The template's importance is not in `best_config.json`; pass it again.", ""]
    if result.log:
        lines += ["## Search log", "", *[f"- {entry}" for entry in result.log], ""]
    if result.notes:
        lines += ["## Notes on the module groups", "", *[f"- {note}" for note in result.notes], ""]
    lines += [
        "## Trials",
        "",
        "| # | node | layers | status | speciality | versatility | feasible | front | train loss | s | cached |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, trial in enumerate(result.trials, start=1):
        mark = " **best**" if trial is best else ""
        lines.append(
            f"| {number} | `{trial.label}`{mark} | {_span(trial.layers)} | {trial.status} | "
            f"{_number(trial.speciality)} | {_number(trial.versatility)} | "
            f"{'yes' if result.objective.feasible(trial) else 'no'} | {'yes' if id(trial) in front else ''} | "
            f"{_number(trial.train_loss)} | {trial.seconds:.1f} | {'yes' if trial.cached else ''} |"
        )
    failed = [t for t in result.trials if not t.ok]
    if failed:
        lines += ["", "Failed trials:", "", *[f"- `{t.label}`: {t.error}" for t in failed]]
    return "\n".join(lines) + "\n"


def plot_search(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """Speciality (y) vs versatility (x) of the successful trials, coloured by module group, front marked.

    Example:
        plot_search(result, "trials.png").suffix
        '.png'
    """
    figure = Figure(figsize=(9.5, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ok = [t for t in result.trials if t.ok]
    groups = list(dict.fromkeys(t.group for t in ok))
    for index, group in enumerate(groups):
        points = [t for t in ok if t.group == group]
        axes.scatter(
            [t.versatility for t in points],
            [t.speciality for t in points],
            color=_COLOURS[index % len(_COLOURS)],
            label=group,
            alpha=0.8,
            s=28,
        )
    front = sorted(result.front, key=lambda t: t.versatility)
    if front:
        axes.plot([t.versatility for t in front], [t.speciality for t in front], color="black", lw=1, zorder=1)
        axes.scatter(
            [t.versatility for t in front],
            [t.speciality for t in front],
            facecolors="none",
            edgecolors="black",
            s=90,
            label="Pareto front",
        )
    best = result.best
    if best is not None:
        axes.scatter([best.versatility], [best.speciality], marker="*", s=260, color="gold", edgecolors="black")
        axes.annotate(best.label, (best.versatility, best.speciality), textcoords="offset points", xytext=(6, 6))
    reference = result.reference
    if reference is not None and reference.ok:
        axes.scatter([reference.versatility], [reference.speciality], marker="x", s=70, color="black", label="base")
    if result.objective.kind != "weighted":
        axes.axvline(result.objective.min_retention, color="grey", ls="--", lw=1, label="versatility threshold")
    axes.set_xlabel("versatility (retention, 1 = base model)")
    axes.set_ylabel("speciality (higher is better)")
    axes.set_title(f"{len(result.trials)} trials, {len(result.failed)} failed; best: {best.label if best else '-'}")
    axes.grid(alpha=0.3)
    if ok:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))
