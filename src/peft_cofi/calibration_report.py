"""Calibration outputs: the result object, a markdown report, JSON, and a plot of the front the candidates trace.

Files written by :func:`write_calibration_outputs` into ``out_dir`` (beside ``adapter/``, the calibrated adapter,
and the cache ``evaluations.jsonl`` that :func:`peft_cofi.calibration.calibrate` writes):

- ``report.md``: settings, the pick and whether it meets the budget, its factors, the search log, the front and a
  table of every candidate;
- ``result.json``: :meth:`CalibrationResult.to_dict`;
- ``front.png``: speciality gain (over the base model) against versatility loss of every candidate, coloured by
  phase, the Pareto front joined, the pick starred, the trained adapter and the budget marked (matplotlib's Agg
  canvas; no pyplot, no backend change). A user picks another point by its factors in ``result.json`` and
  :func:`peft_cofi.scale_diff`.

Example:
    paths = write_calibration_outputs(result, "calibration")
    sorted(paths)
    ['plot', 'report', 'result']
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .calibration_search import Evaluation
from .search_objective import Objective, pareto_front

_PHASE_COLOURS = {
    "reference": "black",
    "line": "tab:blue",
    "refine": "tab:cyan",
    "ascent": "tab:orange",
    "dare": "tab:green",
    "ties": "tab:purple",
}
_TABLE_LIMIT = 400  # candidate rows in the markdown table (result.json has them all)


@dataclass
class CalibrationResult:
    """What a calibration found (see :func:`peft_cofi.calibration.calibrate`).

    Attributes:
        evaluations: every distinct candidate, in the order evaluated.
        chosen: the pick: the highest speciality with versatility >= ``min_versatility``, else the most versatile
            candidate (``None`` only if every evaluation failed).
        met_budget: whether ``chosen`` meets the versatility budget.
        min_versatility: the budget; ``granularity``, ``method``, ``groups``: the search's coordinates.
        stop_reason, log, notes: how the search went and what could not be checked.
        ran, cached: evaluations run now / read from the cache; ``seconds``: wall time.
        settings: the other arguments; ``adapter_dir``: where the calibrated adapter was written, if anywhere.

    Example:
        result.met_budget, result.chosen.label, len(result.evaluations)
        (True, 'layer 2=0 (λ=3.1)', 41)
    """

    evaluations: list[Evaluation]
    chosen: Evaluation | None
    met_budget: bool
    min_versatility: float
    granularity: str
    method: str
    groups: list[str]
    stop_reason: str = ""
    log: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ran: int = 0
    cached: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    adapter_dir: Path | None = None

    def _reference(self, label: str) -> Evaluation | None:
        return next((e for e in self.evaluations if e.phase == "reference" and e.label == label), None)

    @property
    def base(self) -> Evaluation | None:
        """The base model's scores (every factor 0)."""
        return self._reference("base model")

    @property
    def trained(self) -> Evaluation | None:
        """The trained adapter's scores (every factor 1)."""
        return self._reference("trained adapter")

    @property
    def front(self) -> list[Evaluation]:
        """The Pareto front of (speciality, versatility), speciality descending."""
        return pareto_front(self.evaluations)

    @property
    def failed(self) -> list[Evaluation]:
        """Candidates with a non-finite score."""
        return [e for e in self.evaluations if not e.ok]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary, every candidate included."""
        front = {id(e) for e in self.front}
        return {
            "method": self.method,
            "granularity": self.granularity,
            "budget": self.min_versatility,
            "met_budget": self.met_budget,
            "chosen": None if self.chosen is None else self.chosen.to_json() | {"cached": self.chosen.cached},
            "adapter_dir": None if self.adapter_dir is None else str(self.adapter_dir),
            "evaluations": len(self.evaluations),
            "ran": self.ran,
            "cached": self.cached,
            "failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "stop_reason": self.stop_reason,
            "log": self.log,
            "notes": self.notes,
            "groups": self.groups,
            "settings": self.settings,
            "candidates": [e.to_json() | {"cached": e.cached, "front": id(e) in front} for e in self.evaluations],
        }


def write_calibration_outputs(result: CalibrationResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.md``, ``result.json`` and ``front.png`` (see the module docstring); returns their paths.

    Example:
        write_calibration_outputs(result, "out")["plot"].name
        'front.png'
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.md", "result": out / "result.json", "plot": out / "front.png"}
    paths["report"].write_text(calibration_markdown(result), encoding="utf-8")
    paths["result"].write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n", encoding="utf-8")
    plot_front(result, paths["plot"])
    return paths


def _gain_loss(result: CalibrationResult, evaluation: Evaluation) -> tuple[float, float]:
    """(speciality gain over the base model, versatility loss against it)."""
    base = result.base
    s0, v0 = (base.speciality, base.versatility) if base is not None and base.ok else (0.0, 1.0)
    return evaluation.speciality - s0, v0 - evaluation.versatility


def calibration_markdown(result: CalibrationResult) -> str:
    """The markdown report of a calibration.

    Example:
        print(calibration_markdown(result))
    """
    settings, chosen, objective = result.settings, result.chosen, Objective("constrained", result.min_versatility)
    lines = [
        "# Diff calibration",
        "",
        f"- adapter: `{settings.get('adapter')}` (checksum `{settings.get('adapter_checksum')}`)",
        f"- method: {result.method}, granularity: {result.granularity} ({len(result.groups)} group(s))",
        f"- objective: {objective.describe()}",
        f"- evaluators: speciality `{settings.get('speciality')}`, versatility `{settings.get('versatility')}`",
        f"- evaluations: {len(result.evaluations)} ({result.ran} run, {result.cached} from the cache, "
        f"{len(result.failed)} failed) in {result.seconds:.1f} s; {result.stop_reason}",
        "",
    ]
    for what, reference in (("Base model", result.base), ("Trained adapter", result.trained)):
        if reference is not None and reference.ok:
            lines.append(f"{what}: speciality {reference.speciality:.4f}, versatility {reference.versatility:.4f}.")
    lines.append("")
    if chosen is None:
        lines += ["**Every evaluation failed: nothing was written.**", ""]
    else:
        gain, loss = _gain_loss(result, chosen)
        verdict = (
            "meets the budget"
            if result.met_budget
            else "**does not meet the budget: no candidate does; this is the most versatile one**"
        )
        lines += [
            f"**Chosen: `{chosen.label}`** ({verdict}): speciality {chosen.speciality:.4f} (gain {gain:+.4f}), "
            f"versatility {chosen.versatility:.4f} (loss {loss:+.4f})"
            + (f", density {chosen.density:g}" if chosen.density is not None else "")
            + (f"; written to `{result.adapter_dir}`." if result.adapter_dir is not None else "."),
            "",
            "| group | factor |",
            "|---|---|",
            *[f"| `{group}` | {value:.4g} |" for group, value in chosen.scales.items()],
            "",
        ]
    if result.log:
        lines += ["## Search log", "", *[f"- {entry}" for entry in result.log], ""]
    if result.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in result.notes], ""]
    lines += [
        "## Front",
        "",
        "| candidate | factors | speciality | versatility | gain | loss |",
        "|---|---|---|---|---|---|",
    ]
    for evaluation in result.front:
        gain, loss = _gain_loss(result, evaluation)
        lines.append(
            f"| `{evaluation.label}` | {factors_text(evaluation)} | {evaluation.speciality:.4f} | "
            f"{evaluation.versatility:.4f} | {gain:+.4f} | {loss:+.4f} |"
        )
    front = {id(e) for e in result.front}
    lines += [
        "",
        "## Candidates",
        "",
        "| # | candidate | phase | status | speciality | versatility | within budget | front | cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for number, evaluation in enumerate(result.evaluations[:_TABLE_LIMIT], start=1):
        mark = " **chosen**" if evaluation is chosen else ""
        lines.append(
            f"| {number} | `{evaluation.label}`{mark} | {evaluation.phase} | {evaluation.status} | "
            f"{_number(evaluation.speciality)} | {_number(evaluation.versatility)} | "
            f"{'yes' if objective.feasible(evaluation) else 'no'} | {'yes' if id(evaluation) in front else ''} | "
            f"{'yes' if evaluation.cached else ''} |"
        )
    if len(result.evaluations) > _TABLE_LIMIT:
        lines.append(f"\n{len(result.evaluations) - _TABLE_LIMIT} more candidates are in result.json.")
    return "\n".join(lines) + "\n"


def plot_front(result: CalibrationResult, path: str | os.PathLike[str]) -> Path:
    """Speciality gain (y) against versatility loss (x) of every successful candidate, front and pick marked.

    Example:
        plot_front(result, "front.png").suffix
        '.png'
    """
    figure = Figure(figsize=(9.0, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ok = [e for e in result.evaluations if e.ok]
    for phase, colour in _PHASE_COLOURS.items():
        points = [_gain_loss(result, e) for e in ok if e.phase == phase and e.phase != "reference"]
        if points:
            axes.scatter([x for _, x in points], [y for y, _ in points], color=colour, s=22, alpha=0.7, label=phase)
    front = sorted((_gain_loss(result, e) for e in result.front), key=lambda point: point[1])
    if front:
        axes.plot([x for _, x in front], [y for y, _ in front], color="black", lw=1, zorder=1)
        axes.scatter([x for _, x in front], [y for y, _ in front], facecolors="none", edgecolors="black", s=80,
                     label="Pareto front")  # fmt: skip
    axes.scatter([0.0], [0.0], marker="x", s=70, color="black", label="base model")
    if result.trained is not None and result.trained.ok:
        gain, loss = _gain_loss(result, result.trained)
        axes.scatter([loss], [gain], marker="s", s=60, color="grey", edgecolors="black", label="trained adapter")
    if result.chosen is not None and result.chosen.ok:
        gain, loss = _gain_loss(result, result.chosen)
        axes.scatter([loss], [gain], marker="*", s=260, color="gold", edgecolors="black", label="chosen", zorder=3)
        axes.annotate(result.chosen.label, (loss, gain), textcoords="offset points", xytext=(6, 6), fontsize=7)
    base = result.base
    if base is not None and base.ok:
        axes.axvline(base.versatility - result.min_versatility, color="grey", ls="--", lw=1, label="budget")
    axes.set_xlabel("versatility loss (base model's versatility − candidate's)")
    axes.set_ylabel("speciality gain over the base model")
    axes.set_title(
        f"{len(result.evaluations)} candidates ({result.method}, {result.granularity}); "
        f"{'within' if result.met_budget else 'NOT within'} budget {result.min_versatility:g}"
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


def factors_text(evaluation: Evaluation, limit: int = 6) -> str:
    """A candidate's factors in a few words: every group's up to ``limit`` groups, else a summary.

    Example:
        >>> factors_text(Evaluation("k", "x", "ascent", scales={"layer 1": 1.0, "layer 2": 0.0}))
        'layer 1=1, layer 2=0'
        >>> factors_text(Evaluation("k", "x", "dare", method="dare", density=0.3, scales={"all": 1.0}))
        'dare density 0.3, α=1'
    """
    values = list(evaluation.scales.values())
    if evaluation.method != "scale":
        return f"{evaluation.method} density {evaluation.density:g}, α={values[0]:g}"
    if len(set(values)) == 1:
        return f"all {values[0]:g}" if values else "-"
    if len(values) <= limit:
        return ", ".join(f"{group}={value:g}" for group, value in evaluation.scales.items())
    zeros = sum(value == 0 for value in values)
    return f"mean {sum(values) / len(values):.3g} over {len(values)} groups ({zeros} at 0, max {max(values):g})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
