"""Synthetic landscapes for comparing the tree search with exhaustive search, without training.

A landscape is a random (speciality, versatility) function of (modules, layers) with a known structure: speciality
``log(1 + sum of per-cell gains)`` with gains peaking at a random depth and random per-module strengths, versatility
``exp(-2 * mean per-cell cost)`` with random per-module costs tilted by depth. Used by ``bench_search --quick`` and
by the tests.

Example:
    >>> stats = landscape_comparison(20)
    >>> stats["tree_trials_mean"] < stats["exhaustive_trials"]
    True
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from peft_cofi.search import tree_search
from peft_cofi.search_objective import Objective
from peft_cofi.search_space import Candidate, SearchSpace
from peft_cofi.search_trials import Trial


def random_landscape(
    rng: random.Random, space: SearchSpace, strength: float = 2.0
) -> Callable[[tuple[str, ...], tuple[int, ...]], tuple[float, float]]:
    """A random ``score(modules, layers) -> (speciality, versatility)``: speciality ``log(1 + sum of per-cell
    gains)`` (gains peak at a random depth, per-module strengths random), versatility ``exp(-strength * mean
    per-cell cost)`` (per-module costs random, tilted by depth; the mean is over all cells of the model).

    Example:
        >>> score = random_landscape(random.Random(0), SearchSpace("llama", 8))
        >>> speciality, versatility = score(("up_proj", "down_proj"), (2, 3))
        >>> speciality > 0 and 0 < versatility < 1
        True
    """
    depth = space.num_layers
    centre, width, tilt = rng.uniform(0.0, 1.0), rng.uniform(0.1, 0.5), rng.uniform(-0.8, 0.8)
    gain = {m: rng.uniform(0.1, 1.0) for m in space.module_roles}
    cost = {m: rng.uniform(0.2, 1.0) for m in space.module_roles}
    cells = len(space.module_roles) * depth

    def score(modules: tuple[str, ...], layers: tuple[int, ...]) -> tuple[float, float]:
        fractions = [(layer + 0.5) / depth for layer in layers]
        g = sum(gain[m] * math.exp(-((f - centre) ** 2) / (2 * width**2)) for m in modules for f in fractions)
        c = sum(cost[m] * (1 + tilt * (f - 0.5)) for m in modules for f in fractions) / cells
        return math.log1p(g), math.exp(-strength * c)

    return score


def landscape_comparison(
    num_landscapes: int = 200,
    seed: int = 0,
    num_layers: int = 8,
    min_retention: float = 0.9,
    beam_width: int = 1,
    bound: bool = True,
) -> dict[str, Any]:
    """Tree search vs exhaustive search over named groups x the paper's seven windows on random landscapes.

    Returns the fraction of landscapes where the tree found the exhaustive optimum, the mean and worst regret
    (speciality below the optimum, when both picks are feasible), how often the tree's pick was infeasible while a
    feasible node existed, the mean rank of the tree's pick among all nodes, and the mean trial counts.

    Example:
        >>> stats = landscape_comparison(20)
        >>> stats["tree_trials_mean"] < stats["exhaustive_trials"]
        True
    """
    space = SearchSpace("llama", num_layers, leave_one_out=False, max_window_depth=2)
    objective = Objective("constrained", min_retention=min_retention)
    exhaustive_nodes = space.enumerate(2)
    rng = random.Random(seed)
    found, regrets, infeasible, ranks, tree_trials = 0, [], 0, [], []
    for _ in range(num_landscapes):
        score = random_landscape(rng, space)

        def evaluate(nodes, score=score):
            return [_synthetic_trial(node, *score(node.modules, node.layers)) for node in nodes]

        tree, _, _ = tree_search(space, evaluate, objective, beam_width=beam_width, bound=bound)
        tree_trials.append(len(tree))
        everything = objective.ranked(evaluate(exhaustive_nodes))
        pick, optimum = objective.best(tree), everything[0]
        keys = [t.key for t in everything]
        ranks.append(keys.index(pick.key) + 1)
        if pick.key == optimum.key or objective.rank_key(pick) == objective.rank_key(optimum):
            found += 1
        if objective.feasible(optimum):
            if objective.feasible(pick):
                regrets.append(optimum.speciality - pick.speciality)
            else:
                infeasible += 1
    return {
        "landscapes": num_landscapes,
        "min_retention": min_retention,
        "beam_width": beam_width,
        "bound": bound,
        "space": f"{len(space.groups)} named groups x 7 windows of a {num_layers}-layer Llama",
        "exhaustive_trials": len(exhaustive_nodes),
        "tree_trials_mean": sum(tree_trials) / num_landscapes,
        "tree_trials_max": max(tree_trials),
        "found_optimum": found / num_landscapes,
        "mean_rank_of_tree_pick": sum(ranks) / num_landscapes,
        "worst_rank_of_tree_pick": max(ranks),
        "mean_regret": sum(regrets) / max(1, len(regrets)),
        "max_regret": max(regrets, default=0.0),
        "tree_pick_infeasible": infeasible,
    }


def landscape_grid(num_landscapes: int = 200) -> list[dict[str, Any]]:
    """:func:`landscape_comparison` for thresholds 0.85/0.9/0.95, beam widths 1-3, with and without the bound."""
    return [
        landscape_comparison(num_landscapes, min_retention=threshold, beam_width=beam, bound=bound)
        for threshold in (0.85, 0.9, 0.95)
        for beam in (1, 2, 3)
        for bound in (False, True)
    ]


def grid_markdown(rows: list[dict[str, Any]]) -> str:
    """The grid as a markdown table."""
    lines = [
        "| threshold | beam | bound | tree trials (mean) | found optimum | mean rank of pick | worst rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['min_retention']} | {row['beam_width']} | {'yes' if row['bound'] else 'no'} | "
            f"{row['tree_trials_mean']:.1f} of {row['exhaustive_trials']} | {row['found_optimum']:.0%} | "
            f"{row['mean_rank_of_tree_pick']:.2f} | {row['worst_rank_of_tree_pick']} |"
        )
    return "\n".join(lines)


def _synthetic_trial(node: Candidate, speciality: float, versatility: float) -> Trial:
    key = f"{','.join(node.modules)}|{','.join(map(str, node.layers))}"
    return Trial(
        key, node.group, node.window.name, list(node.modules), list(node.layers), "ok", speciality, versatility
    )
