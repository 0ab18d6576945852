"""Aggregate fronts-benchmark runs: per-setting means over seeds, Pareto fronts, a comparison at matched speciality
against full fine-tuning's front, a two-panel PNG, and markdown + JSON.

A point is a (speciality gain, forgetting) pair: the held-out cross-entropy reduction against the base model (higher
is better) and the retention loss, the cross-entropy increase on the base model's own answers to general
instructions (lower is better). The general-English cross-entropy increase is reported too, but short chat
fine-tunes tend to *lower* it on this data, so it cannot rank forgetting. A method *beats* full fine-tuning at a
point when full fine-tuning's front, linearly interpolated at the same speciality gain, forgets more.

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

METRICS = (
    "exact_match",
    "held_out_ce",
    "speciality_gain",
    "general_ce_increase",
    "retention_ce_increase",
    "train_seconds",
)
X, Y = "speciality_gain", "retention_ce_increase"
REFERENCE = "full"


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (higher or equal x and lower or equal y, one strictly)."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any((ox >= x and oy <= y) and (ox > x or oy < y) for ox, oy in points)
    ]


def front_settings(records: list[dict[str, Any]]) -> list[float]:
    """Learning rates of the runs on their method's own front (one method's records)."""
    return [records[i]["lr"] for i in pareto([(r[X], r[Y]) for r in records])]


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, lr): mean and standard deviation (over seeds) of each metric, plus the fixed columns."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["method"], record["lr"]), []).append(record)
    rows = []
    for (method, lr), runs in groups.items():
        row: dict[str, Any] = {"method": method, "lr": lr, "seeds": len(runs)}
        for key in METRICS:
            values = [r[key] for r in runs]
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


def _standard_error(row: dict[str, Any], reference: list[dict[str, Any]]) -> float | None:
    """Standard error of ``row``'s forgetting minus full fine-tuning's interpolated at ``row``'s gain.

    Seed noise enters three ways: the point's own forgetting, its gain (moving where the reference is read, times
    the reference's slope there), and the two reference settings being interpolated. None unless all three have two
    seeds or more (one seed says nothing of the spread).
    """
    for left, right in itertools.pairwise(reference):
        if left[X] <= row[X] <= right[X]:
            break
    else:
        return None
    slope = (right[Y] - left[Y]) / (right[X] - left[X]) if right[X] > left[X] else 0.0
    weight = (row[X] - left[X]) / (right[X] - left[X]) if right[X] > left[X] else 0.0
    seeds = [row.get("seeds", 1), left.get("seeds", 1), right.get("seeds", 1)]
    if min(seeds) < 2:
        return None
    own = (row.get(f"{Y}_std", 0.0) ** 2 + (slope * row.get(f"{X}_std", 0.0)) ** 2) / seeds[0]
    ends = ((1 - weight) * left.get(f"{Y}_std", 0.0)) ** 2 / seeds[1] + (
        weight * right.get(f"{Y}_std", 0.0)
    ) ** 2 / seeds[2]
    return (own + ends) ** 0.5


def matched_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's front points against full fine-tuning's front at the same speciality gain."""
    reference_rows = sorted((r for r in rows if r["method"] == REFERENCE), key=lambda r: (r[X], r[Y]))
    reference_rows = [reference_rows[i] for i in pareto([(r[X], r[Y]) for r in reference_rows])]
    reference = [(r[X], r[Y]) for r in reference_rows]
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for i in pareto([(r[X], r[Y]) for r in mine]):
            row = mine[i]
            at_reference = interpolate(reference, row[X]) if reference else None
            dominated = any(x >= row[X] and y <= row[Y] and (x, y) != (row[X], row[Y]) for x, y in reference)
            out.append(
                {
                    "method": method,
                    "lr": row["lr"],
                    "seeds": row.get("seeds", 1),
                    X: row[X],
                    Y: row[Y],
                    "reference_forgetting": at_reference,
                    "difference": None if at_reference is None else row[Y] - at_reference,
                    "standard_error": None
                    if at_reference is None or method == REFERENCE
                    else _standard_error(row, reference_rows),
                    "dominated_by_reference": dominated,
                }
            )
    return out


def plot_fronts(rows: list[dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (X, Y, "speciality gain: held-out CE reduction (nats)", "forgetting: CE increase on base's own answers (nats)"),
        ("exact_match", "general_ce_increase", "held-out exact match", "general-English CE increase (nats)"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    colours = matplotlib.colormaps["tab20"]
    for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["lr"])
        style = {"color": colours(index % 20), "marker": "os^Dv<>ph*X"[index % 11], "label": labels.get(method, method)}
        if method == REFERENCE:
            style.update(color="black", linewidth=2.5)
        for ax, (x, y, _, _) in zip(axes, panels, strict=True):
            ax.errorbar(
                [r[x] for r in mine],
                [r[y] for r in mine],
                xerr=[r[f"{x}_std"] for r in mine],
                yerr=[r[f"{y}_std"] for r in mine],
                capsize=2,
                linestyle="--" if method.startswith(("lora", "kappa")) else "-",
                **style,
            )
    for ax, (_, _, xlabel, ylabel) in zip(axes, panels, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[0].set_title("Fronts over learning rates (better: right and down)")
    axes[1].set_title("Same runs: accuracy vs general-English CE")
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(row: dict[str, Any], key: str, digits: int) -> str:
    std = row[f"{key}_std"]
    return f"{row[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if row["seeds"] > 1 else "")


def markdown(rows, comparison, base, labels, description, settings) -> str:
    lines = ["# Fronts: speciality gain against forgetting, per method over learning rates", ""]
    lines += [f"- {key}: {value}" for key, value in description.items()]
    lines += [
        f"- steps {settings['steps']}, batch {settings['batch_size']}, AdamW, constant LR; "
        f"mean ± sd over seeds where seeds > 1 (the settings on each method's front)",
        "",
    ]
    lines += [
        f"Base model: held-out CE {base['held_out_ce']:.3f}, exact match {base['exact_match']:.3f}, "
        f"general CE {base['general_ce']:.3f}, retention CE {base['retention_ce']:.3f}.",
        "",
    ]
    lines += [
        "| method | lr | seeds | exact match | held-out CE | gain | general ΔCE | retention ΔCE | trainable "
        "| checkpoint bytes | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {labels.get(r['method'], r['method'])} | {r['lr']:g} | {r['seeds']} | {_pm(r, 'exact_match', 3)} | "
            f"{_pm(r, 'held_out_ce', 3)} | {_pm(r, X, 3)} | {_pm(r, 'general_ce_increase', 4)} | {_pm(r, Y, 4)} | "
            f"{r['trainable_params']:,} | {r['checkpoint_bytes']:,} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "## Front points against full fine-tuning's front at the same speciality gain",
        "",
        "Negative difference: forgets less than full fine-tuning would at that gain. Blank: outside the gains "
        "full fine-tuning's front covers. ± is the standard error of the difference over seeds (the point's "
        "forgetting and gain, and the two full fine-tuning settings interpolated).",
        "",
        "| method | lr | seeds | gain | retention ΔCE | full FT's at that gain | difference | dominated by full FT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparison:
        ref = "" if c["reference_forgetting"] is None else f"{c['reference_forgetting']:.4f}"
        diff = "" if c["difference"] is None else f"{c['difference']:+.4f}"
        diff += "" if c["standard_error"] is None else f" ± {c['standard_error']:.4f}"
        lines.append(
            f"| {labels.get(c['method'], c['method'])} | {c['lr']:g} | {c['seeds']} | {c[X]:.3f} | {c[Y]:.4f} | "
            f"{ref} | {diff} | {'yes' if c['dominated_by_reference'] else 'no'} |"
        )
    return "\n".join(lines + summary_table(comparison, labels)) + "\n"


def summary_table(comparison: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """One line per method, its own front's points joined by " / " (the README's table), as markdown lines."""

    def joined(points: list[dict[str, Any]], key: str, digits: int) -> str:
        return " / ".join("—" if p[key] is None else f"{p[key]:.{digits}f}" for p in points)

    lines = [
        "",
        "## One line per method: its own front (the README's table)",
        "",
        "| method (learning rates) | seeds | gain | forgetting | full FT's forgetting at that gain |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(c["method"] for c in comparison):
        points = sorted((c for c in comparison if c["method"] == method), key=lambda c: c["lr"])
        reference = "—" if method == REFERENCE else joined(points, "reference_forgetting", 3)
        rates = ", ".join(f"{p['lr']:g}" for p in points)
        lines.append(
            f"| {labels.get(method, method)} ({rates}) | "
            f"{' / '.join(str(p['seeds']) for p in points)} | {joined(points, X, 2)} | {joined(points, Y, 3)} | "
            f"{reference} |"
        )
    return lines


def write_report(records, base, methods, description, settings, out_dir: Path, name: str) -> dict[str, Any]:
    """Write ``{name}.md``, ``{name}.json`` and ``{name}.png`` to ``out_dir``; return the JSON document."""
    order = {m.name: i for i, m in enumerate(methods)}
    rows = sorted(aggregate(records), key=lambda r: (order.get(r["method"], len(order)), r["lr"]))
    labels = {m.name: m.label for m in methods}
    comparison = matched_comparison(rows)
    plot_fronts(rows, labels, out_dir / f"{name}.png")
    (out_dir / f"{name}.md").write_text(markdown(rows, comparison, base, labels, description, settings))
    document = {
        "description": description,
        "settings": settings,
        "base": base,
        "rows": rows,
        "comparison": comparison,
        "runs": records,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(document, indent=1))
    return document
