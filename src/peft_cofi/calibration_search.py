"""The calibration search: candidate records, their cache, and the rules that propose candidates.

Model-free: a candidate (:class:`Proposal`) is a point of the scale space (group -> factor, see
:func:`peft_cofi.scales.scale_groups`) or a DARE / TIES setting, and ``run(proposal) -> Evaluation`` is whatever
applies and scores it (:func:`peft_cofi.calibration.calibrate` changes the loaded adapter's ``D`` and runs the two
evaluators: forward passes only). :class:`Runner` evaluates each distinct candidate once, reads earlier runs'
results from a JSONL cache (:class:`EvaluationCache`, the search's :class:`~peft_cofi.search_trials.TrialCache`),
and charges a :class:`~peft_cofi.search_trials.Budget`; a cached candidate charges the seconds it took when it ran,
so a resumed calibration follows the same path and a repeated one evaluates nothing.

The scale search (:func:`scale_search`) maximises speciality subject to versatility >= a threshold:

1. **Line**: one global factor ``α`` at every level (WiSE-FT interpolation), then ``refine`` bisection steps
   between the best feasible ``α`` and the next level up that breaks the threshold.
2. **Coordinate ascent** (``layer`` / ``module`` / ``row`` granularity): from the best feasible point, each group in
   turn takes the level that maximises ``speciality + λ · versatility`` with the others fixed, sweep after sweep
   until no group moves. A constrained objective alone would stall on the threshold (moving one group up breaks it,
   moving another down loses speciality); the price ``λ`` lets the ascent trade them. It starts at the trained
   adapter's exchange rate ``(S_trained - S_base) / (V_base - V_trained)`` and, after each ascent, is divided by 4
   when the ascent ended feasible and multiplied by 4 when it did not (geometric bisection once both are seen),
   restarting from the best feasible point so far.

Every evaluated candidate is a point of the front; the pick is the constrained best of all of them.

Example:
    >>> levels = (0.0, 0.5, 1.0)
    >>> def run(p):  # speciality: group "a" helps; versatility: group "b" hurts
    ...     return Evaluation(str(p.scales), p.label, p.phase, scales=dict(p.scales),
    ...                       speciality=p.scales["a"], versatility=1 - 0.1 * p.scales["b"])
    >>> runner = Runner(run)
    >>> log = scale_search(["a", "b"], levels, runner, min_versatility=0.99)
    >>> best_candidate(runner.evaluations, 0.99).scales
    {'a': 1.0, 'b': 0.0}
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .search_objective import Objective
from .search_trials import Budget, TrialCache

CACHE_FORMAT = "peft-cofi-calibration/1"
METHODS = ("search", "dare", "ties")
DEFAULT_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SPARSE_LEVELS = (0.5, 1.0, 1.5)
DEFAULT_DENSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class Evaluation:
    """One scored candidate (one JSONL line of the cache).

    Attributes:
        key: the cache key (the candidate's effective per-module factors and the run's context, hashed).
        label: what it is, for reports (``"global 0.5"``, ``"layer 3=0 (ascent 1, λ=2.1)"``: the move that made
            it, ``"dare d=0.3 α=1"``).
        phase: ``"reference"``, ``"line"``, ``"refine"``, ``"ascent"``, ``"dare"`` or ``"ties"``.
        method: ``"scale"``, ``"dare"`` or ``"ties"``.
        scales: group -> factor (``{"all": α}`` for DARE / TIES).
        density: the kept fraction of DARE / TIES (``None`` for scaling).
        status: ``"ok"`` or ``"failed"`` (a non-finite score; ``error`` says which).
        speciality, versatility: the evaluators' scores (higher is better).
        metrics: every number the evaluators returned, prefixed ``speciality/`` and ``versatility/``.
        seconds: the evaluation's wall time; ``cached``: read from the cache in this run (not stored).

    Example:
        >>> Evaluation("k", "global 1", "line", speciality=-2.0, versatility=0.99).ok
        True
    """

    key: str
    label: str
    phase: str
    method: str = "scale"
    scales: dict[str, float] = field(default_factory=dict)
    density: float | None = None
    status: str = "ok"
    speciality: float | None = None
    versatility: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        """Both scores are finite."""
        return self.status == "ok" and self.speciality is not None and self.versatility is not None

    def to_json(self) -> dict[str, Any]:
        """The cache record (without ``cached``)."""
        out = asdict(self)
        out.pop("cached")
        return {"format": CACHE_FORMAT, **out}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Evaluation:
        """Inverse of :meth:`to_json`; marks the evaluation as cached.

        Raises:
            ValueError: a field is missing or has the wrong type (a damaged or hand-edited cache line).
        """
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__ and k != "cached"}
        missing = [name for name in ("key", "label", "phase", "status") if not isinstance(known.get(name), str)]
        if missing:
            raise ValueError(f"fields {missing} are missing or not strings")
        numbers = [known.get(name) for name in ("speciality", "versatility", "density")]
        if not all(v is None or _number(v) for v in numbers) or not _number(known.get("seconds", 0.0)):
            raise ValueError("a score, density or time is not a number")
        for name in ("scales", "metrics"):
            value = known.get(name, {})
            if not (isinstance(value, dict) and all(isinstance(k, str) and _number(v) for k, v in value.items())):
                raise ValueError(f"field {name!r} must map names to numbers")
        return cls(**known, cached=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class EvaluationCache(TrialCache):
    """Evaluations stored one JSON object per line (see :class:`~peft_cofi.search_trials.TrialCache`).

    Example:
        >>> import os, tempfile
        >>> cache = EvaluationCache(os.path.join(tempfile.mkdtemp(), "evaluations.jsonl"))
        >>> cache.append(Evaluation("k", "global 1", "line", speciality=-1.0, versatility=1.0))
        >>> cache.load()["k"].cached
        True
    """

    record_format = CACHE_FORMAT
    record_type = Evaluation
    what = "calibration-cache"


@dataclass(frozen=True)
class Proposal:
    """A candidate to evaluate: group -> factor for ``method="scale"``, ``{"all": α}`` and a density for DARE / TIES.

    Example:
        >>> Proposal("global 0.5", "line", {"all": 0.5}).method
        'scale'
    """

    label: str
    phase: str
    scales: Mapping[str, float]
    method: str = "scale"
    density: float | None = None


class BudgetSpent(Exception):
    """Raised by :class:`Runner` when the evaluation budget does not allow the next candidate."""


def proposal_key(proposal: Proposal) -> str:
    """A proposal's identity without a model: method, factors and density as sorted JSON (the default cache key).

    Example:
        >>> proposal_key(Proposal("any label", "line", {"b": 1.0, "a": 0.5}))
        '{"density": null, "method": "scale", "scales": {"a": 0.5, "b": 1.0}}'
    """
    payload = {"method": proposal.method, "scales": dict(proposal.scales), "density": proposal.density}
    return json.dumps(payload, sort_keys=True)


class Runner:
    """Evaluate proposals once each: this run's results, then the cache, then ``measure`` (charging the budget).

    Args:
        measure: ``measure(proposal) -> Evaluation`` with the scores (key, labels, factors and time are filled in).
        key_of: the cache key of a proposal (default :func:`proposal_key`; ``calibrate`` hashes the effective
            per-module factors and the model, adapter and evaluators).
        budget: evaluations and/or seconds allowed (cached candidates count, with their recorded seconds).
        cache: where evaluations are appended as they finish, and read from.
        on_result: called after each new evaluation (progress display).

    Example:
        >>> runner = Runner(lambda p: Evaluation("", p.label, p.phase, speciality=1.0, versatility=1.0))
        >>> first = runner(Proposal("x", "line", {"all": 1.0}))
        >>> runner(Proposal("y", "line", {"all": 1.0})) is first, runner.ran
        (True, 1)
    """

    def __init__(
        self,
        measure: Callable[[Proposal], Evaluation],
        key_of: Callable[[Proposal], str] = proposal_key,
        budget: Budget | None = None,
        cache: EvaluationCache | None = None,
        on_result: Callable[[Evaluation], None] | None = None,
    ) -> None:
        self.measure, self.key_of = measure, key_of
        self.budget, self.cache, self.on_result = budget or Budget(), cache, on_result
        self.known: dict[str, Evaluation] = cache.load() if cache is not None else {}
        self.evaluations: list[Evaluation] = []
        self._seen: dict[str, Evaluation] = {}
        self.ran = self.cached = 0

    def __call__(self, proposal: Proposal, free: bool = False) -> Evaluation:
        """The evaluation of ``proposal``; ``free`` skips the budget check (the two references always run).

        Raises:
            BudgetSpent: the budget does not allow another new candidate.
        """
        key = self.key_of(proposal)
        if key in self._seen:
            return self._seen[key]
        if not free and not self.budget.allows_next():
            raise BudgetSpent
        labels = {
            "label": proposal.label,
            "phase": proposal.phase,
            "scales": dict(proposal.scales),
            "method": proposal.method,
            "density": proposal.density,
        }
        if key in self.known:
            evaluation = dataclasses.replace(self.known[key], **labels, cached=True)
            self.cached += 1
        else:
            started = time.perf_counter()
            measured = self.measure(proposal)
            evaluation = dataclasses.replace(
                measured, **labels, key=key, seconds=time.perf_counter() - started, cached=False
            )
            self.ran += 1
            if self.cache is not None:
                self.cache.append(evaluation)
        self.budget.charge(evaluation.seconds)
        self._seen[key] = evaluation
        self.evaluations.append(evaluation)
        if self.on_result is not None:
            self.on_result(evaluation)
        return evaluation


def best_candidate(evaluations: Sequence[Evaluation], min_versatility: float) -> Evaluation | None:
    """The pick: the highest speciality among candidates with versatility >= ``min_versatility`` (equal speciality:
    the more versatile), else the most versatile candidate; ``None`` if none succeeded.

    Example:
        >>> a = Evaluation("a", "a", "line", speciality=1.0, versatility=0.99)
        >>> b = Evaluation("b", "b", "line", speciality=1.0, versatility=0.995)
        >>> best_candidate([a, b], 0.98).key, best_candidate([a, b], 0.999).key
        ('b', 'b')
    """
    ok = [e for e in evaluations if e.ok]
    feasible = [e for e in ok if e.versatility >= min_versatility]
    if feasible:
        return max(feasible, key=lambda e: (e.speciality, e.versatility))
    return max(ok, key=lambda e: (e.versatility, e.speciality), default=None)


def _objective_value(evaluation: Evaluation, price: float) -> float:
    if not evaluation.ok:
        return float("-inf")
    return evaluation.speciality + price * evaluation.versatility


def initial_price(base: Evaluation, trained: Evaluation) -> float:
    """The trained adapter's exchange rate of speciality for versatility: ``ΔS / ΔV`` between the base and the
    trained adapter, with both differences kept away from zero.

    Example:
        >>> base = Evaluation("b", "base", "reference", speciality=-3.0, versatility=1.0)
        >>> initial_price(base, Evaluation("t", "trained", "reference", speciality=-2.0, versatility=0.75))
        4.0
    """
    if not (base.ok and trained.ok):
        return 1.0
    gain = max(abs(trained.speciality - base.speciality), 1e-9)
    loss = max(abs(base.versatility - trained.versatility), 1e-9)
    return gain / loss


def scale_search(
    groups: Sequence[str],
    levels: Sequence[float],
    run: Runner,
    min_versatility: float,
    refine: int = 3,
    rounds: int = 3,
    sweeps: int = 3,
    log: list[str] | None = None,
) -> list[str]:
    """The line, refinement and price-guided coordinate ascent of the module docstring; returns the log (``log``,
    when given, is appended to as the search goes, so it survives :class:`BudgetSpent`).

    ``run`` raises :class:`BudgetSpent` to stop the search (the caller catches it). With one group the line and
    its refinement are the whole search.

    Example:
        scale_search(["layer 0", "layer 1"], (0.0, 0.5, 1.0), runner, min_versatility=0.98)
    """
    objective = Objective("constrained", min_retention=min_versatility)
    uniform = {level: {group: level for group in groups} for level in levels}
    log = [] if log is None else log
    base = run(Proposal("base model", "reference", dict.fromkeys(groups, 0.0)), free=True)
    trained = run(Proposal("trained adapter", "reference", dict.fromkeys(groups, 1.0)), free=True)
    line = {0.0: base, 1.0: trained}
    for level in levels:
        line[level] = run(Proposal(f"global {level:g}", "line", uniform[level]))
    best_line = best_candidate([line[a] for a in sorted(line)], min_versatility)
    if best_line is None:
        log.append(f"line: all {len(line)} global factors failed; nothing to refine")
        return log
    alpha = next(a for a in sorted(line) if line[a] is best_line)
    above = [a for a in sorted(line) if a > alpha and line[a].ok and not objective.feasible(line[a])]
    if above and objective.feasible(best_line):
        high = above[0]
        for _ in range(refine):
            middle = (alpha + high) / 2
            evaluation = run(Proposal(f"global {middle:.4g}", "refine", dict.fromkeys(groups, middle)))
            if objective.feasible(evaluation):
                alpha = middle
            else:
                high = middle
        log.append(f"line: {len(line)} global factors, refined to α = {alpha:.4g} at the versatility threshold")
    else:
        log.append(f"line: {len(line)} global factors, best α = {alpha:g}")
    if len(groups) < 2:
        return log
    price = initial_price(base, trained)
    feasible_price = infeasible_price = None
    for number in range(1, rounds + 1):
        scaled = [e for e in run.evaluations if e.method == "scale" and set(e.scales) == set(groups)]
        start = best_candidate(scaled, min_versatility) or best_line
        _, end, moves = _ascend(groups, levels, run, dict(start.scales), price, sweeps, f"ascent {number}")
        feasible = objective.feasible(end)
        log.append(
            f"ascent {number}: λ = {price:.4g}, {moves} move(s), ended "
            f"{'within' if feasible else 'beyond'} the versatility threshold"
        )
        if feasible:
            feasible_price = price if feasible_price is None else min(feasible_price, price)
        else:
            infeasible_price = price if infeasible_price is None else max(infeasible_price, price)
        if feasible_price is not None and infeasible_price is not None:
            price = math.sqrt(feasible_price * infeasible_price)
        else:
            price = price / 4 if feasible else price * 4
    return log


def _ascend(
    groups: Sequence[str],
    levels: Sequence[float],
    run: Runner,
    point: dict[str, float],
    price: float,
    sweeps: int,
    tag: str = "ascent",
) -> tuple[dict[str, float], Evaluation, int]:
    """Coordinate ascent on ``speciality + price * versatility``; returns the end point, its evaluation, moves."""
    current = run(Proposal(_describe(point), "ascent", dict(point)))
    moves = 0
    for _ in range(sweeps):
        moved = False
        for group in groups:
            best, best_level = current, point[group]
            for level in levels:
                if level == point[group]:
                    continue
                candidate = {**point, group: level}
                evaluation = run(Proposal(f"{group}={level:g} ({tag}, λ={price:.3g})", "ascent", candidate))
                if _objective_value(evaluation, price) > _objective_value(best, price) + 1e-12:
                    best, best_level = evaluation, level
            if best_level != point[group]:
                point, current, moved = {**point, group: best_level}, best, True
                moves += 1
        if not moved:
            break
    return point, current, moves


def _describe(point: Mapping[str, float]) -> str:
    values = set(point.values())
    if len(values) == 1:
        return f"global {next(iter(values)):g}"
    return ", ".join(f"{group}={value:g}" for group, value in point.items())


def sparsify_search(
    method: str, densities: Sequence[float], levels: Sequence[float], run: Runner, log: list[str] | None = None
) -> list[str]:
    """Evaluate DARE or TIES at every density x rescaling factor ``α`` (after the two references); returns the log
    (appended to ``log`` when given).

    Example:
        >>> runner = Runner(lambda p: Evaluation("", p.label, p.phase, speciality=1.0, versatility=1.0))
        >>> sparsify_search("ties", [0.5], [1.0], runner)
        ['ties: 1 densities x 1 factors']
    """
    log = [] if log is None else log
    run(Proposal("base model", "reference", {"all": 0.0}), free=True)
    run(Proposal("trained adapter", "reference", {"all": 1.0}), free=True)
    log.append(f"{method}: {len(densities)} densities x {len(levels)} factors")
    for density in densities:
        for level in levels:
            run(Proposal(f"{method} d={density:g} α={level:g}", method, {"all": level}, method, density))
    return log
