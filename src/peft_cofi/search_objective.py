"""How search trials are ranked: the objective (constrained, weighted or Pareto) and the Pareto front.

Scores are "higher is better": speciality (e.g. minus the held-out loss) and versatility (a retention, 1 = the base
model's; see :mod:`peft_cofi.evaluation`).

- ``"constrained"`` (default): maximise speciality among trials with versatility >= ``min_retention``; a trial
  below the threshold ranks after every feasible one, and infeasible trials rank by versatility (closest to the
  threshold first), so the search moves toward feasibility when nothing is feasible yet.
- ``"weighted"``: maximise ``speciality + weight * versatility`` (the scores are added as they come: choose
  ``weight`` for their scales).
- ``"pareto"``: the goal is the front of non-dominated (speciality, versatility) trials. The search ranks nodes by
  the constrained order to pick where to descend, and a level counts as an improvement when it adds a point to the
  front; the reported best is the constrained pick among the front.

Failed trials rank last under every objective and are never on the front.

Example:
    >>> from peft_cofi.search_trials import Trial
    >>> good = Trial("a", "ffn", "bottom2", [], [], "ok", speciality=-1.0, versatility=0.99)
    >>> greedy = Trial("b", "attn_ffn", "bottom-plus", [], [], "ok", speciality=-0.5, versatility=0.90)
    >>> Objective("constrained", min_retention=0.98).best([good, greedy]).key
    'a'
    >>> Objective("weighted", weight=10.0).best([good, greedy]).key
    'a'
    >>> [t.key for t in pareto_front([good, greedy])]
    ['b', 'a']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .search_trials import Trial

OBJECTIVES = ("constrained", "weighted", "pareto")
DEFAULT_MIN_RETENTION = 0.98
_WORST = (-2, float("-inf"))


@dataclass(frozen=True)
class Objective:
    """A ranking of trials (see the module docstring).

    Args:
        kind: ``"constrained"``, ``"weighted"`` or ``"pareto"``.
        min_retention: the versatility threshold of ``"constrained"`` (and of the best pick of ``"pareto"``);
            0.98 allows a cross-entropy increase of about 0.02 nats with the built-in retention evaluator.
        weight: the versatility weight of ``"weighted"``.

    Example:
        >>> Objective("weighted", weight=2.0).value(Trial("k", "g", "w", [], [], "ok", 1.0, 0.5))
        2.0
    """

    kind: str = "constrained"
    min_retention: float = DEFAULT_MIN_RETENTION
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective={self.kind!r} is not known; use one of {OBJECTIVES}.")

    def feasible(self, trial: Trial) -> bool:
        """The trial succeeded and (for constrained/pareto) meets the versatility threshold."""
        if not trial.ok:
            return False
        return self.kind == "weighted" or trial.versatility >= self.min_retention

    def rank_key(self, trial: Trial) -> tuple[int, float]:
        """A sort key, larger is better: ``(feasible?, value)``; failed trials get the smallest key."""
        if not trial.ok:
            return _WORST
        if self.kind == "weighted":
            return (1, self.value(trial))
        if self.feasible(trial):
            return (1, trial.speciality)
        return (0, trial.versatility)

    def value(self, trial: Trial) -> float:
        """The scalar the objective maximises (weighted sum, or speciality), for display; -inf if failed."""
        if not trial.ok:
            return float("-inf")
        if self.kind == "weighted":
            return trial.speciality + self.weight * trial.versatility
        return trial.speciality

    def best(self, trials: Sequence[Trial]) -> Trial | None:
        """The top trial (the earliest among equals); for ``"pareto"`` the top one among the front."""
        pool = pareto_front(trials) if self.kind == "pareto" else [t for t in trials if t.ok]
        ranked = self.ranked(pool)
        return ranked[0] if ranked else None

    def ranked(self, trials: Sequence[Trial]) -> list[Trial]:
        """Trials best first; ties keep their order."""
        return sorted(trials, key=self.rank_key, reverse=True)

    def improves(self, new: Sequence[Trial], old: Sequence[Trial], min_improvement: float = 0.0) -> bool:
        """Whether ``new`` trials beat everything in ``old``.

        Scalar objectives: the best new trial's key exceeds the best old one's, by more than ``min_improvement``
        when both are equally feasible. ``"pareto"``: some new trial is better than every old trial by more than
        ``min_improvement`` in speciality or in versatility (it extends the front).

        Example:
            >>> a = Trial("a", "g", "w", [], [], "ok", 1.0, 0.99)
            >>> b = Trial("b", "g", "w", [], [], "ok", 1.2, 0.99)
            >>> Objective().improves([b], [a]), Objective().improves([b], [a], min_improvement=0.5)
            (True, False)
        """
        fresh = [t for t in new if t.ok]
        if not fresh:
            return False
        done = [t for t in old if t.ok]
        if not done:
            return True
        if self.kind == "pareto":
            return any(all(_beats(t, o, min_improvement) for o in done) for t in fresh)
        best_new = max(self.rank_key(t) for t in fresh)
        best_old = max(self.rank_key(t) for t in done)
        if best_new[0] != best_old[0]:
            return best_new[0] > best_old[0]
        return best_new[1] > best_old[1] + min_improvement

    def promising(self, candidates: Sequence[Trial], done: Sequence[Trial], limit: int = 1) -> list[Trial]:
        """Infeasible ``candidates`` worth refining although they lose: their speciality exceeds that of the best
        feasible trial in ``done`` (all of them if none is feasible yet), highest speciality first, at most
        ``limit``. Narrowing a node usually lowers speciality and raises versatility, so a feasible node rarely has
        a better descendant, while an infeasible one with more speciality than the incumbent may. ``"weighted"``
        has no constraint, hence no promising trials.

        Example:
            >>> incumbent = Trial("a", "g", "w", [], [], "ok", 1.0, 0.99)
            >>> over = Trial("b", "g", "w", [], [], "ok", 2.0, 0.90)
            >>> [t.key for t in Objective().promising([over], [incumbent, over])]
            ['b']
        """
        if self.kind == "weighted":
            return []
        feasible = [t.speciality for t in done if self.feasible(t)]
        floor = max(feasible, default=float("-inf"))
        pool = [t for t in candidates if t.ok and not self.feasible(t) and t.speciality > floor]
        return sorted(pool, key=lambda t: t.speciality, reverse=True)[:limit]

    def describe(self) -> str:
        """One line for reports.

        Example:
            >>> Objective().describe()
            'maximise speciality subject to versatility >= 0.98'
        """
        if self.kind == "weighted":
            return f"maximise speciality + {self.weight:g} * versatility"
        if self.kind == "pareto":
            return (
                "Pareto front of (speciality, versatility); best = top speciality with versatility >= "
                f"{self.min_retention:g}"
            )
        return f"maximise speciality subject to versatility >= {self.min_retention:g}"


def as_objective(
    objective: str | Objective, min_retention: float | None = None, weight: float | None = None
) -> Objective:
    """An :class:`Objective` from a name or an instance (``min_retention``/``weight`` override its fields).

    Example:
        >>> as_objective("weighted", weight=3.0).weight
        3.0
    """
    base = Objective(objective) if isinstance(objective, str) else objective
    if not isinstance(base, Objective):
        raise TypeError(f"objective must be one of {OBJECTIVES} or an Objective; got {type(objective).__name__}.")
    return Objective(
        base.kind,
        base.min_retention if min_retention is None else min_retention,
        base.weight if weight is None else weight,
    )


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """Successful trials no other trial dominates (at least as good in both scores, better in one), by speciality
    descending.

    Example:
        >>> trials = [Trial("a", "g", "w", [], [], "ok", 1.0, 0.9), Trial("b", "g", "w", [], [], "ok", 0.5, 0.8)]
        >>> [t.key for t in pareto_front(trials)]
        ['a']
    """
    ok = [t for t in trials if t.ok]
    front = [t for t in ok if not any(_dominates(o, t) for o in ok if o is not t)]
    unique = {(t.speciality, t.versatility): t for t in reversed(front)}  # equal points: keep the earliest
    return sorted(unique.values(), key=lambda t: (-t.speciality, -t.versatility))


def _dominates(a: Trial, b: Trial) -> bool:
    return (
        a.speciality >= b.speciality
        and a.versatility >= b.versatility
        and (a.speciality > b.speciality or a.versatility > b.versatility)
    )


def _beats(new: Trial, old: Trial, margin: float) -> bool:
    return new.speciality > old.speciality + margin or new.versatility > old.versatility + margin
