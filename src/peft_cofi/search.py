"""``search_modules``: find which modules in which layers to train, by a coarse-to-fine tree search.

Each node of the search space (:mod:`peft_cofi.search_space`: module group x layer window) is scored by a trial
(:func:`peft_cofi.search_trials.run_trial`): a short CoFi fine-tune from the exact base weights, then a speciality
and a versatility evaluator. Trials are ranked by an :class:`~peft_cofi.search_objective.Objective`.

The tree rule (``strategy="tree"``):

1. **Groups.** Score the first-level groups (attention, FFN, attention+FFN) on the three half-depth windows.
2. **Windows.** From the best node (the best ``beam_width`` nodes), score the same modules on the child windows
   (halves: ``bottom-plus`` -> ``bottom1``, ``bottom2``; then eighths, ...). If the level beats every trial so far,
   descend again from its best; otherwise stop narrowing.
3. **Modules.** From the best node overall, score the same window with fewer modules (named subgroups such as
   ``ffn`` -> ``ffn_up_down``, then each leave-one-out subset) and repeat while a level improves.

A level *improves* when its best trial beats the best trial so far by more than ``min_improvement`` under the
objective (Pareto: when it extends the front). With ``bound=True`` (constrained and Pareto objectives) a node that
fails the versatility threshold but has more speciality than the best feasible node is refined too (the
``beam_width`` best such nodes per level, improving or not): narrowing usually trades speciality for versatility, so
such a node may hide a feasible descendant that beats the incumbent. The search stops when the budget (trials
and/or minutes) is spent, when the module stage brings no improvement and no such node is left, or when no
narrower node exists. A greedy descent can miss an optimum
whose coarse parents score badly; ``strategy="exhaustive"`` scores every named group on every window down to
``exhaustive_depth`` (the paper's seven windows at depth 2) for comparison, and a list of
:class:`~peft_cofi.search_space.Candidate` scores exactly those nodes. docs/SEARCH.md has the measured comparison.

Budget: every trial counts, also one read from the cache, and a cached trial charges the seconds it took when it
ran, so an interrupted search resumed with the same budget follows the same path and stops where the uninterrupted
one would have. A trial is not started when the seconds spent plus the mean trial time so far exceed the budget.

Cache: every trial is appended to a JSONL file (``cache``, default ``out_dir/trials.jsonl``) keyed by the node's
modules and layers, the training data's and base model's fingerprints, the evaluators' fingerprints (built-in
evaluators hash their batches; other callables are identified by name, or set ``cache_tag``), the template config,
seed, steps and learning rate. A repeated search reads every trial and trains nothing.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
    ...                                     num_attention_heads=2, vocab_size=50))
    >>> batches = [{"input_ids": torch.randint(0, 50, (2, 6))}]
    >>> score = lambda model: 1.0
    >>> result = search_modules(base, batches, score, score, budget_trials=3, steps=1, progress=False)
    >>> result.ran, result.stop_reason
    (3, 'budget spent (3 trials)')
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .config import CoFiConfig
from .evaluation import Batch, Evaluator, fingerprint_batches
from .search_objective import Objective, as_objective, pareto_front
from .search_report import write_search_outputs
from .search_space import FULL_DEPTH, Candidate, SearchSpace, distinct_nodes
from .search_trials import (
    Budget,
    Trial,
    TrialCache,
    clock,
    config_id,
    evaluator_id,
    fingerprint_model,
    run_trial,
    trial_key,
)

STRATEGIES = ("tree", "exhaustive")
Evaluate = Callable[[Sequence[Candidate]], list[Trial]]


@dataclass
class SearchResult:
    """What a search found: every trial in order, the best one, the front, and how the search went.

    Example:
        result.best.label, result.best_config().layers_to_transform
        ('ffn_up_down@bottom2', [8, 9, 10, 11, 12, 13, 14])
    """

    trials: list[Trial]
    objective: Objective
    strategy: str
    stop_reason: str
    reference: Trial | None = None
    log: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ran: int = 0
    cached: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    template: CoFiConfig | None = None

    @property
    def best(self) -> Trial | None:
        """The objective's top trial (``None`` if every trial failed)."""
        return self.objective.best(self.trials)

    @property
    def front(self) -> list[Trial]:
        """The Pareto front of (speciality, versatility), speciality descending."""
        return pareto_front(self.trials)

    @property
    def failed(self) -> list[Trial]:
        """Trials with a non-finite loss or score."""
        return [t for t in self.trials if not t.ok]

    def best_config(self) -> CoFiConfig:
        """A fresh ``CoFiConfig`` for the best node (other fields from the search's template config).

        Raises:
            ValueError: if no trial succeeded.
        """
        best = self.best
        if best is None:
            raise ValueError("no trial succeeded, so there is no best configuration.")
        fields = {}
        if self.template is not None:
            fields = {k: getattr(self.template, k) for k in self.template.__dataclass_fields__ if k != "peft_type"}
        return CoFiConfig(**{**fields, **best.config_kwargs()})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (trials included)."""
        best = self.best
        return {
            "strategy": self.strategy,
            "objective": dataclasses.asdict(self.objective),
            "stop_reason": self.stop_reason,
            "log": self.log,
            "notes": self.notes,
            "ran": self.ran,
            "cached": self.cached,
            "failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "settings": self.settings,
            "best": None if best is None else {"label": best.label, **best.config_kwargs()},
            "front": [t.label for t in self.front],
            "reference": None if self.reference is None else self.reference.to_json(),
            "trials": [t.to_json() | {"cached": t.cached} for t in self.trials],
        }


def tree_search(
    space: SearchSpace,
    evaluate: Evaluate,
    objective: Objective,
    beam_width: int = 1,
    min_improvement: float = 0.0,
    bound: bool = True,
) -> tuple[list[Trial], str, list[str]]:
    """The coarse-to-fine rule of the module docstring over any ``evaluate(candidates) -> trials`` function.

    ``evaluate`` returns one trial per candidate in order, fewer when the budget runs out. Returns the trials,
    the stop reason and a per-level log.

    Example:
        >>> space = SearchSpace("llama", 8)
        >>> def evaluate(nodes):  # speciality: trained cells in layers 2-3; versatility: fewer cells
        ...     return [Trial(str(n), n.group, n.window.name, list(n.modules), list(n.layers), "ok",
        ...                   sum(layer in (2, 3) for layer in n.layers) * len(n.modules),
        ...                   1 - 0.001 * len(n.modules) * len(n.layers)) for n in nodes]
        >>> trials, reason, log = tree_search(space, evaluate, Objective())
        >>> Objective().best(trials).label, len(trials)
        ('attn_ffn@bottom2', 25)
    """
    if beam_width < 1:
        raise ValueError(f"beam_width={beam_width} must be at least 1.")
    history: list[tuple[Candidate, Trial]] = []
    log: list[str] = []

    def run(nodes: list[Candidate]) -> tuple[list[tuple[Candidate, Trial]], bool]:
        pairs = list(zip(nodes, evaluate(nodes), strict=False))
        history.extend(pairs)
        return pairs, len(pairs) == len(nodes)

    def top(pairs: list[tuple[Candidate, Trial]]) -> list[Candidate]:
        ranked = sorted((p for p in pairs if p[1].ok), key=lambda p: objective.rank_key(p[1]), reverse=True)
        return [node for node, _ in ranked[:beam_width]]

    def trials() -> list[Trial]:
        return [t for _, t in history]

    def promising(pairs: list[tuple[Candidate, Trial]]) -> list[Candidate]:
        if not bound:
            return []
        chosen = objective.promising([t for _, t in pairs], trials(), beam_width)
        return [node for node, trial in pairs if any(trial is c for c in chosen)]

    level, complete = run(space.first_level())
    log.append(f"groups: {len(level)} trials on the half-depth windows")
    if not complete:
        return trials(), "budget spent", log
    reason = "no narrower node left"
    for stage, expand in (("windows", space.narrower), ("modules", space.module_subsets)):
        frontier, depth = distinct_nodes(top(history) + promising(history)), 1
        while frontier:
            tried = {(node.modules, node.layers) for node, _ in history}
            children = distinct_nodes(
                [c for node in frontier for c in expand(node) if (c.modules, c.layers) not in tried]
            )
            if not children:
                log.append(f"{stage} level {depth}: nothing left to refine")
                reason = f"{stage}: nothing left to refine"
                break
            before = trials()
            level, complete = run(children)
            if not complete:
                log.append(f"{stage} level {depth}: budget spent after {len(level)} of {len(children)} trials")
                return trials(), "budget spent", log
            improved = objective.improves([t for _, t in level], before, min_improvement)
            frontier = distinct_nodes((top(level) if improved else []) + promising(level))
            log.append(
                f"{stage} level {depth}: {len(level)} trials, {'improved' if improved else 'no improvement'}"
                + (f", {len(frontier)} node(s) to refine" if frontier else "")
            )
            if not frontier:
                reason = f"no improvement at {stage} level {depth}"
            depth += 1
    return trials(), reason, log


def search_modules(
    model: nn.Module | Callable[[], nn.Module],
    train_batches: Sequence[Batch],
    speciality: Evaluator,
    versatility: Evaluator,
    *,
    budget_trials: int | None = None,
    budget_minutes: float | None = None,
    steps: int = 20,
    lr: float = 1e-4,
    seed: int = 0,
    objective: str | Objective = "constrained",
    min_retention: float | None = None,
    weight: float | None = None,
    strategy: str | Sequence[Candidate] = "tree",
    space: SearchSpace | None = None,
    template: CoFiConfig | None = None,
    beam_width: int = 1,
    min_improvement: float = 0.0,
    bound: bool = True,
    exhaustive_depth: int = 2,
    cache: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    cache_tag: str = "",
    verify_base: bool = True,
    progress: bool = True,
) -> SearchResult:
    """Search module groups x layer windows for the best CoFi coarse configuration (see the module docstring).

    Args:
        model: the base causal LM (restored exactly after every trial), or a factory building it afresh per trial.
        train_batches: the speciality training batches (``input_ids``, ``attention_mask``, ``labels``).
        speciality: ``evaluator(model) -> score`` or ``{"score": ..., ...}``, higher is better, e.g.
            :func:`peft_cofi.evaluation.loss_evaluator`.
        versatility: the same for general abilities, as a retention (1 = the base model's), e.g.
            :func:`peft_cofi.evaluation.retention_evaluator`.
        budget_trials, budget_minutes: stop after this many trials / minutes (either, both, or neither).
        steps, lr, seed: each trial's fine-tune: ``steps`` AdamW steps at learning rate ``lr``.
        objective: ``"constrained"`` (default), ``"weighted"``, ``"pareto"`` or an ``Objective``;
            ``min_retention`` and ``weight`` override its threshold and weight.
        strategy: ``"tree"`` (default), ``"exhaustive"``, or a list of candidates to score.
        space: the search space; default ``SearchSpace.from_model(model)``.
        template: a ``CoFiConfig`` whose other fields (mask mode, importance, ...) every trial uses.
        beam_width: how many of a level's best nodes the tree refines.
        min_improvement: how much a level must beat the best so far to count as an improvement.
        bound: also refine infeasible nodes with more speciality than the best feasible one (see the module
            docstring); constrained and Pareto objectives only.
        exhaustive_depth: window depth of ``strategy="exhaustive"``.
        cache: the JSONL trial cache; default ``out_dir/trials.jsonl`` (none without ``out_dir``).
        out_dir: write ``best_config.json``, ``best_adapter/adapter_config.json``, ``report.md``, ``trials.png``
            and ``result.json`` there.
        cache_tag: extra text in the cache key (e.g. a version of custom evaluators).
        verify_base: fingerprint the base weights and check them after every trial.
        progress: show a tqdm bar (trial, node, budget spent and left).

    Raises:
        RuntimeError: if a trial left the base weights changed.

    Example:
        result = search_modules(model, train, loss_evaluator(held_out), retention_evaluator(general),
                                budget_trials=14, steps=25, out_dir="search")
    """
    started = time.perf_counter()
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not known; use one of {STRATEGIES} or a list of candidates.")
    is_factory = callable(model) and not isinstance(model, nn.Module)
    base = model() if is_factory else model
    space = space or SearchSpace.from_model(base)
    chosen = as_objective(objective, min_retention, weight)
    train_batches = list(train_batches)
    base_print = fingerprint_model(base)
    context = {
        "data": fingerprint_batches(train_batches),
        "model": base_print,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "speciality": evaluator_id(speciality),
        "versatility": evaluator_id(versatility),
        "template": config_id(template),
        "tag": cache_tag,
    }
    cache_path = cache if cache is not None else (Path(out_dir) / "trials.jsonl" if out_dir is not None else None)
    store = TrialCache(cache_path) if cache_path is not None else None
    known = store.load() if store is not None else {}
    budget = Budget(budget_trials, None if budget_minutes is None else budget_minutes * 60)
    counts = {"ran": 0, "cached": 0}

    def check(current: nn.Module) -> nn.Module:
        if verify_base and fingerprint_model(current) != base_print:
            raise RuntimeError(
                "the base model's weights differ from those the search started with"
                + (": the factory must build identical weights every call." if is_factory else ".")
            )
        return current

    def run_one(node: Candidate, key: str, trial_steps: int = steps, count: bool = True) -> Trial:
        if key in known:
            counts["cached"] += count
            return dataclasses.replace(known[key], group=node.group, window=node.window.name)
        trial_base = check(model()) if is_factory else base
        trial = run_trial(
            trial_base, node, train_batches, speciality, versatility, trial_steps, lr, seed, template, key
        )
        if not is_factory:
            check(base)  # the trial restored the exact base weights
        counts["ran"] += count
        known[key] = trial
        if store is not None:
            store.append(trial)
        return dataclasses.replace(trial, cached=False)

    first = space.first_level()[0]
    reference_node = Candidate(first.modules, first.layers, "base model", FULL_DEPTH)
    # The base model's own scores, for the report: a zero adapter, no training; not a search trial.
    reference = run_one(reference_node, trial_key(reference_node, **context, reference=True), 0, count=False)
    total = budget_trials
    planned: list[Candidate] = []
    if strategy != "tree":
        planned = space.enumerate(exhaustive_depth) if strategy == "exhaustive" else list(strategy)
        total = len(planned) if total is None else min(total, len(planned))
    bar = tqdm(total=total, desc="search", unit="trial", disable=not progress, dynamic_ncols=True)

    def evaluate(nodes: Sequence[Candidate]) -> list[Trial]:
        out = []
        for node in nodes:
            if not budget.allows_next():
                break
            bar.set_description(f"trial {budget.spent_trials + 1}")
            bar.set_postfix_str(f"{node.label} | {budget.describe()}")
            trial = run_one(node, trial_key(node, **context))
            budget.charge(trial.seconds)
            out.append(trial)
            bar.set_postfix_str(f"{node.label} {'cached' if trial.cached else trial.status} | {budget.describe()}")
            bar.update()
        return out

    try:
        if strategy == "tree":
            trials, reason, log = tree_search(space, evaluate, chosen, beam_width, min_improvement, bound)
        else:
            trials = evaluate(planned)
            reason = "every node scored" if len(trials) == len(planned) else _spent_budget(budget)
            log = [f"{len(trials)} of {len(planned)} planned nodes scored"]
    finally:
        bar.close()
    if reason.startswith("budget"):
        reason = _spent_budget(budget)
    result = SearchResult(
        trials=trials,
        objective=chosen,
        strategy=strategy if isinstance(strategy, str) else "given",
        stop_reason=reason,
        reference=reference,
        log=log,
        notes=list(space.notes),
        ran=counts["ran"],
        cached=counts["cached"],
        seconds=time.perf_counter() - started,
        settings={
            "model_type": space.model_type,
            "num_layers": space.num_layers,
            "steps": steps,
            "lr": lr,
            "seed": seed,
            "budget_trials": budget_trials,
            "budget_minutes": budget_minutes,
            "beam_width": beam_width,
            "min_improvement": min_improvement,
            "bound": bound,
            "speciality": context["speciality"],
            "versatility": context["versatility"],
        },
        template=template,
    )
    if out_dir is not None:
        write_search_outputs(result, out_dir)
    return result


def _spent_budget(budget: Budget) -> str:
    if budget.trials is not None and budget.spent_trials >= budget.trials:
        return f"budget spent ({budget.trials} trials)"
    return f"budget spent ({clock(budget.spent_seconds)} of {clock(budget.seconds or 0.0)})"
