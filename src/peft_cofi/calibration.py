"""``calibrate``: rescale a trained CoFi diff after the fact, for the best speciality within a versatility budget.

The adapter is loaded once onto the given model (``PeftModel.from_pretrained``, with its usual base check), and every
candidate is applied by swapping the loaded layers' ``D`` for a scaled (or DARE / TIES-sparsified) copy for the
duration of its two evaluations, then putting the original tensor back
(:func:`peft_cofi.calibration_apply.replaced_deltas`; exact, no reload). The search rules are in
:mod:`peft_cofi.calibration_search`, the scale math in :mod:`peft_cofi.scales`, the written adapter comes from
:func:`peft_cofi.scale_diff` and the report from :mod:`peft_cofi.calibration_report`.

``model`` is the base model the adapter was trained on, plain (then it is returned to its state afterwards: the
adapter is unloaded and parameter flags and train/eval mode restored) or a ``PeftModel`` holding CoFi adapters
(then the adapter folder is loaded again as an extra adapter, ``"cofi-calibration"``, which is deleted afterwards;
the adapters already there are not used). The folder is the single source of truth: what is scored is exactly what
is written.

Example:
    result = calibrate(base, "out/adapter", speciality=loss_evaluator(validation),
                       versatility=retention_evaluator(general), budget=0.98, granularity="layer", out_dir="calib")
    result.met_budget, result.chosen.scales, result.adapter_dir
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration_apply import NewDelta, attached, replaced_deltas
from .calibration_report import CalibrationResult, write_calibration_outputs
from .calibration_search import (
    CACHE_FORMAT,
    DEFAULT_DENSITIES,
    DEFAULT_LEVELS,
    DEFAULT_SPARSE_LEVELS,
    METHODS,
    BudgetSpent,
    Evaluation,
    EvaluationCache,
    Proposal,
    Runner,
    best_candidate,
    scale_search,
    sparsify_search,
)
from .checkpoint import adapter_layers
from .diff_format import in_model_order, read_diff_file
from .diff_scaling import cofi_weights_path, file_checksum, rewrite_diff, scale_diff
from .evaluation import Batch, Evaluator, model_inputs
from .scales import GRANULARITIES, check_density, group_factors, module_seed, scale_groups, sparsify_delta
from .search_objective import Objective
from .search_trials import Budget, _as_score, evaluator_id, fingerprint_model


def batch_examples(batches: Iterable[Batch]) -> list[tuple[int, ...]]:
    """Every example of some batches as its non-padding token ids (for overlap checks).

    Example:
        >>> batch_examples([{"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}])
        [(5, 6)]
    """
    out = []
    for batch in batches:
        inputs = model_inputs(batch)
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
            out.append(tuple(ids[mask.bool()].tolist()))
    return out


def check_disjoint(validation: Iterable[Batch], others: Mapping[str, Iterable[Batch] | None]) -> None:
    """Refuse a validation set that shares an example with the training or versatility data.

    Raises:
        ValueError: naming the other set, how many examples are shared and what to do.

    Example:
        >>> batch = {"input_ids": torch.tensor([[1, 2]])}
        >>> check_disjoint([batch], {"training": [batch]})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: 1 of 1 validation examples also appear in the training data; ...
    """
    examples = batch_examples(validation)
    seen = set(examples)
    for what, batches in others.items():
        if batches is None:
            continue
        shared = seen & set(batch_examples(batches))
        if shared:
            count = sum(example in shared for example in examples)
            raise ValueError(
                f"{count} of {len(examples)} validation examples also appear in the {what} data; scales chosen on them "
                "would reward memorising it. Use a held-out validation split that shares no example with the "
                "training and versatility data."
            )


def _check_settings(
    budget: float,
    granularity: str,
    method: str,
    levels: Sequence[float],
    budget_count: int | None,
    max_minutes: float | None,
) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget={budget!r} must be a number: the least versatility score to keep (e.g. 0.98).")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not supported; use one of {GRANULARITIES}.")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {METHODS}.")
    if not levels or not all(_number(v) and math.isfinite(v) and v >= 0 for v in levels):
        raise ValueError(f"levels={list(levels)!r} must be a non-empty list of finite factors >= 0, e.g. 0,0.5,1.")
    if budget_count is not None and (isinstance(budget_count, bool) or budget_count < 1):
        raise ValueError(f"max_evaluations={budget_count!r} must be a positive integer.")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes={max_minutes!r} must be positive.")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def calibrate(
    model: nn.Module,
    adapter: str | os.PathLike,
    *,
    speciality: Evaluator,
    versatility: Evaluator,
    budget: float = 0.98,
    granularity: str = "layer",
    method: str = "search",
    levels: Sequence[float] | None = None,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    row_groups: int = 4,
    refine: int = 3,
    rounds: int = 3,
    sweeps: int = 3,
    max_evaluations: int | None = None,
    max_minutes: float | None = None,
    train_batches: Iterable[Batch] | None = None,
    out_dir: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    cache_tag: str = "",
    seed: int = 0,
    verify_base: bool = True,
    progress: bool = True,
) -> CalibrationResult:
    """Choose per-group factors for a trained CoFi diff (or a DARE / TIES sparsification) that maximise speciality
    subject to versatility >= ``budget``, and write the calibrated adapter, a report and a plot of the front.

    Args:
        model: the base model (see the module docstring: plain, or a ``PeftModel`` of CoFi adapters).
        adapter: the trained CoFi adapter folder (another method's folder is refused with what would be needed).
        speciality: ``evaluator(model) -> score`` or ``{"score": ...}``, higher is better, on a validation split,
            e.g. :func:`peft_cofi.evaluation.loss_evaluator` or ``exact_match_evaluator``.
        versatility: the same for general abilities, as a retention (1 = the base model's), e.g.
            :func:`peft_cofi.evaluation.retention_evaluator` (``"ce"``: exp(-CE increase), ``"kl"``: exp(-KL)).
        budget: the least versatility score the calibrated adapter must keep (0.98 ≈ a CE increase of 0.02 nats).
        granularity: the search's coordinates: ``"global"`` (one factor, WiSE-FT), ``"layer"``, ``"module"`` or
            ``"row"`` (``row_groups`` groups of rows per module, by how much they changed).
        method: ``"search"`` (line + coordinate ascent over factors), ``"dare"`` or ``"ties"`` (sparsify each
            module's diff at each of ``densities``, rescaled by each of ``levels``).
        levels: the factors a coordinate may take (default 0, 0.25, 0.5, 0.75, 1; for DARE / TIES 0.5, 1, 1.5).
        densities: kept fractions tried by DARE / TIES.
        refine: bisection steps of the global factor at the threshold; ``rounds``: ascents with an adapted price;
            ``sweeps``: passes over the groups per ascent.
        max_evaluations, max_minutes: evaluation budget (the two references, base and trained adapter, always
            run; cached evaluations count, with the time they took).
        train_batches: the training data, only to refuse a validation set that overlaps it (the versatility data
            is checked too, when the evaluators expose their ``batches`` as the built-in ones do).
        out_dir: write ``adapter/`` (the calibrated adapter), ``report.md``, ``result.json``, ``front.png`` and the
            cache ``evaluations.jsonl`` there.
        cache: the JSONL evaluation cache (default ``out_dir/evaluations.jsonl``; none without ``out_dir``).
        cache_tag: extra text in the cache key (e.g. a version of custom evaluators).
        seed: DARE's random drop (per module, derived from it).
        verify_base: refuse a diff made for other base weights (the normal loading check).
        progress: show a progress bar.

    Returns:
        :class:`~peft_cofi.calibration_report.CalibrationResult`: every candidate, the front, the pick
        (``chosen``) and whether it meets the budget (``met_budget``; when no candidate does, the most versatile
        one is written and a warning says so).

    Raises:
        ValueError: bad settings, a non-CoFi adapter, a validation set overlapping the training or versatility
            data, or an output folder that is the adapter's.
        peft_cofi.CheckpointError: the diff does not fit the model (other base weights, missing modules, ...).

    Example:
        calibrate(base, "out/adapter", speciality=loss_evaluator(val), versatility=retention_evaluator(general),
                  budget=0.98, granularity="row", max_evaluations=200, out_dir="out/calibration")
    """
    started = time.perf_counter()
    sparse = method in ("dare", "ties")
    levels = tuple(levels if levels is not None else DEFAULT_SPARSE_LEVELS if sparse else DEFAULT_LEVELS)
    _check_settings(budget, granularity, method, levels, max_evaluations, max_minutes)
    levels = tuple(sorted({float(v) for v in levels}))
    densities = tuple(check_density(d) for d in densities) if sparse else ()
    weights = cofi_weights_path(adapter)
    if out_dir is not None and Path(out_dir, "adapter").resolve() == weights.parent.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} would overwrite the adapter being calibrated; choose another.")
    notes = _check_data(speciality, versatility, train_batches)
    diff_file = read_diff_file(weights)
    rows = {name: diff_file.records[name]["shape"][0] for name in in_model_order(diff_file.records)}
    norms = {name: diff_file.diff(name).norm(dim=1) for name in rows}
    groups = scale_groups(norms, "global" if sparse else granularity, row_groups)
    context = {
        "format": CACHE_FORMAT,
        "adapter": file_checksum(weights),
        "model": fingerprint_model(model),
        "speciality": evaluator_id(speciality),
        "versatility": evaluator_id(versatility),
        "tag": cache_tag,
    }
    cache_path = cache if cache is not None else (Path(out_dir) / "evaluations.jsonl" if out_dir is not None else None)
    budget_left = Budget(max_evaluations, None if max_minutes is None else max_minutes * 60)
    objective = Objective("constrained", min_retention=budget)
    with attached(model, weights.parent, verify_base) as (peft_model, name):
        layers = adapter_layers(peft_model, name)
        bar = tqdm(total=max_evaluations, desc="calibrate", unit="eval", disable=not progress, dynamic_ncols=True)

        def new_delta(proposal: Proposal) -> NewDelta:
            if proposal.method == "scale":
                factors = group_factors(groups, proposal.scales, rows)
                return lambda module, delta: None if bool((factors[module] == 1).all()) else (
                    delta * factors[module].to(delta.device, delta.dtype).unsqueeze(1)
                )  # fmt: skip
            return lambda module, delta: sparsify_delta(
                delta, layers[module].cofi_mask[name], layers[module].cofi_mask_mode[name], proposal.method,
                proposal.density, proposal.scales["all"], module_seed(seed, module),
            )  # fmt: skip

        def measure(proposal: Proposal) -> Evaluation:
            with replaced_deltas(layers, name, new_delta(proposal)):
                return _score(peft_model, speciality, versatility)

        def key_of(proposal: Proposal) -> str:
            return _candidate_key(proposal, groups, rows, context, seed)

        def shown(evaluation: Evaluation) -> None:
            bar.update()
            state = "cached" if evaluation.cached else evaluation.status
            bar.set_postfix_str(f"{evaluation.label} {state} | {runner.ran} run, {runner.cached} cached")

        store = EvaluationCache(cache_path) if cache_path is not None else None
        runner = Runner(measure, key_of, budget_left, store, shown)
        stop_reason, log = "search finished", []
        try:
            if sparse:
                sparsify_search(method, densities, levels, runner, log)
            else:
                scale_search(list(groups), levels, runner, budget, refine, rounds, sweeps, log)
        except BudgetSpent:
            stop_reason = f"evaluation budget spent ({budget_left.spent_trials} evaluations)"
        finally:
            bar.close()
    chosen = best_candidate(runner.evaluations, budget)
    met = chosen is not None and objective.feasible(chosen)
    result = CalibrationResult(
        evaluations=runner.evaluations,
        chosen=chosen,
        met_budget=met,
        min_versatility=budget,
        granularity="global" if sparse else granularity,
        method=method,
        groups=list(groups),
        stop_reason=stop_reason,
        log=log,
        notes=notes,
        ran=runner.ran,
        cached=runner.cached,
        seconds=time.perf_counter() - started,
        settings={
            "adapter": str(weights.parent),
            "adapter_checksum": context["adapter"],
            "levels": list(levels),
            "densities": list(densities),
            "row_groups": row_groups,
            "refine": refine,
            "rounds": rounds,
            "sweeps": sweeps,
            "max_evaluations": max_evaluations,
            "max_minutes": max_minutes,
            "seed": seed,
            "speciality": context["speciality"],
            "versatility": context["versatility"],
        },
    )
    if chosen is not None and not met:
        warnings.warn(
            f"no candidate meets the versatility budget {budget:g}; the pick is the most versatile one "
            f"({chosen.label}: speciality {chosen.speciality:.4f}, versatility {chosen.versatility:.4f})"
            + (", written as the calibrated adapter" if out_dir is not None else "")
            + ". Lower the budget, or add smaller levels.",
            stacklevel=2,
        )
    if out_dir is not None:
        if chosen is not None:
            result.adapter_dir = _write_choice(result, weights.parent, Path(out_dir) / "adapter", groups, rows, seed)
        write_calibration_outputs(result, out_dir)
    return result


def _check_data(speciality: Evaluator, versatility: Evaluator, train_batches: Iterable[Batch] | None) -> list[str]:
    """Refuse overlapping data; returns notes on what could not be checked."""
    validation = getattr(speciality, "batches", None)
    general = getattr(versatility, "batches", None)
    notes = []
    if validation is None:
        notes.append("the speciality evaluator exposes no batches: its overlap with other data was not checked")
        return notes
    if general is None:
        notes.append("the versatility evaluator exposes no batches: its overlap with the validation set is unchecked")
    check_disjoint(validation, {"training": list(train_batches) if train_batches is not None else None,
                                "versatility": general})  # fmt: skip
    return notes


def _score(model: nn.Module, speciality: Evaluator, versatility: Evaluator) -> Evaluation:
    scores, metrics = [], {}
    for prefix, evaluator in (("speciality", speciality), ("versatility", versatility)):
        with torch.no_grad():
            score, extra = _as_score(evaluator(model))
        if not math.isfinite(score):
            return Evaluation("", "", "", status="failed", metrics=metrics, error=f"{prefix} score is {score}")
        scores.append(score)
        metrics.update({f"{prefix}/{k}": v for k, v in extra.items()})
    return Evaluation("", "", "", speciality=scores[0], versatility=scores[1], metrics=metrics)


def _candidate_key(proposal: Proposal, groups: Mapping, rows: Mapping[str, int], context: Mapping, seed: int) -> str:
    """A hash of what the candidate does to each module (so equal factors from any granularity share a key) and of
    the run's context (adapter, model, evaluators)."""
    if proposal.method == "scale":
        factors = group_factors(groups, proposal.scales, rows)
        payload: dict = {
            name: float(v[0]) if bool((v == v[0]).all()) else hashlib.blake2b(v.numpy().tobytes()).hexdigest()
            for name, v in factors.items()
        }
    else:
        alpha = proposal.scales["all"]
        payload = {"method": proposal.method, "density": proposal.density, "alpha": alpha, "seed": seed}
    text = json.dumps({**context, "candidate": payload}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _write_choice(
    result: CalibrationResult, adapter: Path, out: Path, groups: Mapping, rows: Mapping[str, int], seed: int
) -> Path:
    """Write the chosen candidate as an adapter folder (the same factors or sparsification the evaluation used)."""
    chosen = result.chosen
    record = {
        "calibration": {
            "label": chosen.label,
            "granularity": result.granularity,
            "groups": chosen.scales,
            "speciality": chosen.speciality,
            "versatility": chosen.versatility,
            "budget": result.min_versatility,
            "met_budget": result.met_budget,
        },
        "granularity": result.granularity,
    }
    if chosen.method == "scale":
        factors = group_factors(groups, chosen.scales, rows)
        return scale_diff(adapter, out, dict(factors), record=record)
    source = read_diff_file(cofi_weights_path(adapter))
    mode = source.header.mask_mode

    def sparsified(module: str, delta: torch.Tensor) -> torch.Tensor:
        alpha = chosen.scales["all"]
        return sparsify_delta(
            delta, source.mask(module), mode, chosen.method, chosen.density, alpha, module_seed(seed, module)
        )

    scaling = {"method": chosen.method, "density": chosen.density, "alpha": chosen.scales["all"], "seed": seed}
    scaling.update(record)
    return rewrite_diff(adapter, out, sparsified, scaling)
