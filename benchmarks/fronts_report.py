"""Aggregate fronts-benchmark runs: per-setting means over seeds, Pareto fronts, a comparison at matched speciality
against full fine-tuning's front for every versatility measure, the project's goal verdict, a PNG, markdown + JSON.

A point is a (speciality gain, forgetting) pair: the held-out cross-entropy reduction against the base model (higher
is better) and a forgetting measure (lower is better). Each measure gets its own fronts: ``retention`` (the CE
increase on the base model's own answers to general instructions; the headline), the chat corpora (general text as
assistant answers) and ``general`` (plain WordNet sentences, which short chat fine-tunes *lower* here, so it cannot
rank forgetting on its own). A method *beats* full fine-tuning at a point when full fine-tuning's front, linearly
interpolated at the same speciality gain, forgets more.

The goal (issue 17): a point at a gain of at least 95 % of full fine-tuning's best gain that forgets at most half
of what full fine-tuning forgets at that gain, separated by at least 3 standard errors.

Example:
    >>> pareto([(1.0, 0.1), (2.0, 0.3), (1.5, 0.4)])
    [0, 1]
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = ("exact_match", "held_out_ce", "speciality_gain", "train_seconds")
X, Y = "speciality_gain", "retention_ce_increase"  # Y: the headline measure
REFERENCE = "full"
MEASURE_LABELS = {
    "retention_ce_increase": "retention: CE increase on the base model's own answers",
    "retention_definitions_ce_increase": "retention 2: CE increase on the base's own answers to definition questions",
    "chat_quotes_ce_increase": "chat quotes: CE increase on sayings as assistant answers",
    "chat_code_ce_increase": "chat code: CE increase on Python code as assistant answers",
    "chat_definitions_ce_increase": "chat definitions: CE increase on Devil's Dictionary answers",
    "general_ce_increase": "plain English (WordNet sentences): CE increase",
}
GOAL_GAIN, GOAL_FRACTION, GOAL_SIGMAS = 0.95, 0.5, 3.0
BEYOND = " (beyond full fine-tuning's gains: against its best-gain point)"


def measures(records: list[dict[str, Any]]) -> list[str]:
    """The forgetting measures some record has, headline first.

    Example:
        >>> measures([{"retention_ce_increase": 0.1, "chat_code_ce_increase": 0.2, "held_out_ce": 3.0}])
        ['retention_ce_increase', 'chat_code_ce_increase']
    """
    found = {k for r in records for k in r if k.endswith("_ce_increase")}
    return [m for m in MEASURE_LABELS if m in found] + sorted(found - set(MEASURE_LABELS))


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (higher or equal x and lower or equal y, one strictly)."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any((ox >= x and oy <= y) and (ox > x or oy < y) for ox, oy in points)
    ]


def front_settings(records: list[dict[str, Any]]) -> list[float]:
    """Learning rates of the runs on their method's own front for any measure (one method's records)."""
    lrs = {records[i]["lr"] for m in measures(records) for i in pareto([(r[X], r.get(m, 0.0)) for r in records])}
    return sorted(lrs)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, lr): mean and standard deviation (over seeds) of each metric, plus the fixed columns."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["method"], record["lr"]), []).append(record)
    rows = []
    for (method, lr), runs in groups.items():
        row: dict[str, Any] = {"method": method, "lr": lr, "seeds": len(runs)}
        for key in (*METRICS, *measures(runs)):
            values = [r[key] for r in runs if key in r]
            if len(values) < len(runs):  # measured on some seeds only (added later): the row has no such point
                continue
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["trainable_params"] = runs[0]["trainable_params"]
        row["checkpoint_bytes"] = runs[0]["checkpoint_bytes"]
        rows.append(row)
    return rows


def interpolate(front: list[tuple[float, float]], x: float) -> float | None:
    """Forgetting of a front (sorted by gain) at gain ``x``, linearly interpolated; None outside its range."""
    for (x0, y0), (x1, y1) in itertools.pairwise(front):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return front[0][1] if len(front) == 1 and abs(front[0][0] - x) < 1e-9 else None


def _standard_error(row: dict[str, Any], reference: list[dict[str, Any]], y: str, beyond: bool) -> float | None:
    """Standard error of ``row``'s forgetting minus full fine-tuning's interpolated at ``row``'s gain.

    Seed noise enters three ways: the point's own forgetting, its gain (moving where the reference is read, times
    the reference's slope there), and the two reference settings being interpolated (beyond the reference's gains:
    its best-gain setting alone). None unless all of them have two seeds or more (one seed says nothing of the
    spread).
    """
    if beyond:  # against the reference's best-gain point alone: no slope, no interpolation
        left = right = reference[-1]
    else:
        for left, right in itertools.pairwise(reference):
            if left[X] <= row[X] <= right[X]:
                break
        else:
            return None
    slope = (right[y] - left[y]) / (right[X] - left[X]) if right[X] > left[X] else 0.0
    weight = (row[X] - left[X]) / (right[X] - left[X]) if right[X] > left[X] else 0.0
    seeds = [row.get("seeds", 1), left.get("seeds", 1), right.get("seeds", 1)]
    if min(seeds) < 2:
        return None
    own = (row.get(f"{y}_std", 0.0) ** 2 + (slope * row.get(f"{X}_std", 0.0)) ** 2) / seeds[0]
    ends = ((1 - weight) * left.get(f"{y}_std", 0.0)) ** 2 / seeds[1] + (
        weight * right.get(f"{y}_std", 0.0)
    ) ** 2 / seeds[2]
    return (own + ends) ** 0.5


def matched_comparison(
    rows: list[dict[str, Any]], y: str = Y, reference_method: str = REFERENCE
) -> list[dict[str, Any]]:
    """Each method's front points (for measure ``y``) against the reference method's front (default: full
    fine-tuning's) at the same speciality gain; a point with more gain than the reference ever reaches is compared
    with the reference's best-gain point (``beyond_reference``), which favours the reference: along its front,
    forgetting rises with gain."""
    rows = [r for r in rows if y in r]
    reference_rows = sorted((r for r in rows if r["method"] == reference_method), key=lambda r: (r[X], r[y]))
    reference_rows = [reference_rows[i] for i in pareto([(r[X], r[y]) for r in reference_rows])]
    reference = [(r[X], r[y]) for r in reference_rows]
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for i in pareto([(r[X], r[y]) for r in mine]):
            row = mine[i]
            at_reference = interpolate(reference, row[X]) if reference else None
            beyond = bool(reference) and row[X] > reference[-1][0]
            if beyond:  # the reference cannot reach this gain; its best point forgets less than it would here
                at_reference = reference[-1][1]
            dominated = any(x >= row[X] and f <= row[y] and (x, f) != (row[X], row[y]) for x, f in reference)
            out.append(
                {
                    "method": method,
                    "lr": row["lr"],
                    "seeds": row.get("seeds", 1),
                    X: row[X],
                    "forgetting": row[y],
                    "reference_forgetting": at_reference,
                    "difference": None if at_reference is None else row[y] - at_reference,
                    "standard_error": None
                    if at_reference is None or method == reference_method
                    else _standard_error(row, reference_rows, y, beyond),
                    "dominated_by_reference": dominated,
                    "beyond_reference": beyond,
                }
            )
    return out


def goal_verdict(rows: list[dict[str, Any]], comparison: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The front points that reach the goal, or come closest: gain >= 95 % of full fine-tuning's best, forgetting
    <= half of full fine-tuning's at that gain, by >= 3 standard errors. Sorted by how much they forget relative to
    full fine-tuning; ``met`` says whether all three hold."""
    best = max((r[X] for r in rows if r["method"] == REFERENCE), default=None)
    if best is None:
        return []
    out = []
    for c in comparison:
        reference = c["reference_forgetting"]
        if c["method"] == REFERENCE or c[X] < GOAL_GAIN * best or reference is None or reference <= 0:
            continue  # where full fine-tuning does not forget (its CE falls) there is nothing to halve
        ratio = c["forgetting"] / reference
        margin = GOAL_FRACTION * reference - c["forgetting"]
        sigmas = None if not c["standard_error"] else margin / c["standard_error"]
        met = ratio <= GOAL_FRACTION and sigmas is not None and sigmas >= GOAL_SIGMAS
        out.append({**c, "ratio": ratio, "sigmas_below_half": sigmas, "met": met})
    return sorted(out, key=lambda c: c["ratio"])


def plot_fronts(rows: list[dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    """One panel per forgetting measure: every method's points over learning rates, full fine-tuning in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = measures(rows)
    columns = min(3, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // columns), columns, figsize=(6.5 * columns, 5.5 * -(-len(panels) // 3)))
    axes = list(getattr(axes, "flat", [axes]))
    colours = matplotlib.colormaps["tab20"]
    for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        style = {"color": colours(index % 20), "marker": "os^Dv<>ph*X"[index % 11], "label": labels.get(method, method)}
        if method == REFERENCE:
            style.update(color="black", linewidth=2.5)
        for ax, y in zip(axes, panels, strict=False):
            mine = sorted((r for r in rows if r["method"] == method and y in r), key=lambda r: r["lr"])
            ax.errorbar(
                [r[X] for r in mine],
                [r[y] for r in mine],
                xerr=[r[f"{X}_std"] for r in mine],
                yerr=[r[f"{y}_std"] for r in mine],
                capsize=2,
                linestyle="--" if method.startswith(("lora", "kappa")) else "-",
                **style,
            )
    for ax, y in zip(axes, panels, strict=False):
        ax.set_xlabel("speciality gain: held-out CE reduction (nats)")
        ax.set_ylabel("forgetting (nats)")
        ax.set_title(MEASURE_LABELS.get(y, y), fontsize=10)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Fronts over learning rates (better: right and down)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(row: dict[str, Any], key: str, digits: int) -> str:
    if key not in row:
        return "—"
    std = row[f"{key}_std"]
    return f"{row[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if row["seeds"] > 1 else "")


def _short(measure: str) -> str:
    return measure.removesuffix("_ce_increase").replace("_", " ") + " ΔCE"


def markdown(rows, comparisons, verdicts, base, labels, description, settings) -> str:
    names = list(comparisons)
    lines = ["# Fronts: speciality gain against forgetting, per method over learning rates", ""]
    lines += [f"- {key}: {value}" for key, value in description.items()]
    lines += [
        f"- steps {settings['steps']}, batch {settings['batch_size']}, AdamW, constant LR; "
        f"mean ± sd over seeds where seeds > 1 (the settings on each method's front)",
        "",
        "Base model: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ".",
        "",
        "| method | lr | seeds | exact match | held-out CE | gain | "
        + " | ".join(_short(m) for m in names)
        + " | trainable | checkpoint bytes | train s |",
        "|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {labels.get(r['method'], r['method'])} | {r['lr']:g} | {r['seeds']} | {_pm(r, 'exact_match', 3)} | "
            f"{_pm(r, 'held_out_ce', 3)} | {_pm(r, X, 3)} | "
            + " | ".join(_pm(r, m, 4) for m in names)
            + f" | {r['trainable_params']:,} | {r['checkpoint_bytes']:,} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "## The goal: at >= 95 % of full fine-tuning's best gain, forget at most half, by >= 3 SE", ""]
    for measure, verdict in verdicts.items():
        met = [v for v in verdict if v["met"]]
        closest = verdict[0] if verdict else None
        winners = [
            f"{labels.get(v['method'], v['method'])} (lr {v['lr']:g}){BEYOND * v['beyond_reference']}" for v in met
        ]
        state = f"**met** by {', '.join(winners)}"
        if not met:
            state = "not met"
            if closest:
                sigmas = closest["sigmas_below_half"]
                state += (
                    f"; closest: {labels.get(closest['method'], closest['method'])} at lr {closest['lr']:g} forgets "
                    f"{closest['ratio']:.2f}x full fine-tuning's at gain {closest[X]:.3f}"
                    + BEYOND * closest["beyond_reference"]
                    + ("" if sigmas is None else f" ({sigmas:+.1f} SE from half)")
                )
        lines.append(f"- {MEASURE_LABELS.get(measure, measure)}: {state}.")
    for measure, comparison in comparisons.items():
        lines += [
            "",
            f"## Against full fine-tuning at the same gain: {MEASURE_LABELS.get(measure, measure)}",
            "",
            "Negative difference: forgets less than full fine-tuning would at that gain. Blank: below the gains "
            "full fine-tuning's front covers; `*`: beyond them, so compared with its best-gain point (which "
            "favours full fine-tuning). ± is the standard error of the difference over seeds.",
            "",
            "| method | lr | seeds | gain | forgetting | full FT's at that gain | difference | dominated by full FT |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in comparison:
            ref = _reference_cell(c, 4, missing="")
            diff = "" if c["difference"] is None else f"{c['difference']:+.4f}"
            diff += "" if c["standard_error"] is None else f" ± {c['standard_error']:.4f}"
            lines.append(
                f"| {labels.get(c['method'], c['method'])} | {c['lr']:g} | {c['seeds']} | {c[X]:.3f} | "
                f"{c['forgetting']:.4f} | {ref} | {diff} | {'yes' if c['dominated_by_reference'] else 'no'} |"
            )
    return "\n".join(lines + summary_table(comparisons.get(Y, []), labels)) + "\n"


def _reference_cell(comparison: dict[str, Any], digits: int, missing: str) -> str:
    """Full fine-tuning's forgetting at a point's gain, starred where it is read at full fine-tuning's best gain."""
    if comparison["reference_forgetting"] is None:
        return missing
    return f"{comparison['reference_forgetting']:.{digits}f}" + "*" * comparison["beyond_reference"]


def summary_table(comparison: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """One line per method, its own retention front's points joined by " / " (the README's table)."""

    def joined(points: list[dict[str, Any]], key: str, digits: int) -> str:
        return " / ".join("—" if p[key] is None else f"{p[key]:.{digits}f}" for p in points)

    def differences(points: list[dict[str, Any]]) -> str:
        return " / ".join(
            "—"
            if p["difference"] is None
            else f"{p['difference']:+.3f}" + ("" if p["standard_error"] is None else f" ± {p['standard_error']:.3f}")
            for p in points
        )

    lines = [
        "",
        "## One line per method: its own retention front (the README's table)",
        "",
        "`*`: beyond full fine-tuning's gains, compared with its best-gain point.",
        "",
        "| method (learning rates) | seeds | gain | forgetting | full FT's at that gain | difference |",
        "|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(c["method"] for c in comparison):
        points = sorted((c for c in comparison if c["method"] == method), key=lambda c: c["lr"])
        reference = "—" if method == REFERENCE else " / ".join(_reference_cell(p, 3, missing="—") for p in points)
        rates = ", ".join(f"{p['lr']:g}" for p in points)
        lines.append(
            f"| {labels.get(method, method)} ({rates}) | {' / '.join(str(p['seeds']) for p in points)} | "
            f"{joined(points, X, 2)} | {joined(points, 'forgetting', 3)} | {reference} | "
            f"{'—' if method == REFERENCE else differences(points)} |"
        )
    return lines


def write_report(records, base, methods, description, settings, out_dir: Path, name: str) -> dict[str, Any]:
    """Write ``{name}.md``, ``{name}.json`` and ``{name}.png`` to ``out_dir``; return the JSON document."""
    order = {m.name: i for i, m in enumerate(methods)}
    rows = sorted(aggregate(records), key=lambda r: (order.get(r["method"], len(order)), r["lr"]))
    labels = {m.name: m.label for m in methods}
    # Each measure's front from the seeds that have it (a measure added later was rerun on some seeds only); gain
    # and forgetting of a point come from the same runs.
    per_measure = {measure: aggregate([r for r in records if measure in r]) for measure in measures(records)}
    comparisons = {measure: matched_comparison(per_measure[measure], measure) for measure in per_measure}
    verdicts = {measure: goal_verdict(per_measure[measure], comparisons[measure]) for measure in per_measure}
    plot_fronts(rows, labels, out_dir / f"{name}.png")
    (out_dir / f"{name}.md").write_text(markdown(rows, comparisons, verdicts, base, labels, description, settings))
    document = {
        "description": description,
        "settings": settings,
        "base": base,
        "rows": rows,
        "comparisons": comparisons,
        "goal": verdicts,
        "runs": records,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(document, indent=1))
    return document
