"""One search trial: attach a CoFi adapter for a candidate, fine-tune briefly, evaluate, restore the base model;
plus the trial record, its cache key and the JSONL cache that makes searches resumable.

A trial never changes the base weights: the adapter holds the trained diff and ``unload()`` puts the original
modules back (CoFi changes base weights only when merged, and a trial never merges). :func:`fingerprint_model`
hashes the base state so the search can verify this after every trial.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft_cofi.search_space import SearchSpace, Window
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
    ...                                     num_attention_heads=2, vocab_size=50))
    >>> before = fingerprint_model(base)
    >>> node = SearchSpace.from_model(base).candidate("ffn_up_down", Window(0.25, 0.5))
    >>> batches = [{"input_ids": torch.randint(0, 50, (2, 6))}]
    >>> score = lambda model: 1.0
    >>> trial = run_trial(base, node, batches, score, score, steps=2, lr=1e-3)
    >>> trial.status, fingerprint_model(base) == before
    ('ok', True)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from .config import CoFiConfig
from .evaluation import Batch, Evaluator, model_inputs
from .search_space import Candidate

CACHE_FORMAT = "peft-cofi-search-trial/1"
STATUSES = ("ok", "failed")


@dataclass
class Trial:
    """The record of one evaluated node (one JSONL line of the cache).

    Attributes:
        key: the cache key (see :func:`trial_key`).
        group, window: the node's module group and window names; ``modules``, ``layers``: what was trained.
        status: ``"ok"`` or ``"failed"`` (non-finite loss or score; ``error`` says why).
        speciality, versatility: the evaluators' scores (higher is better; ``None`` when failed).
        metrics: every number the evaluators returned, prefixed ``speciality/`` and ``versatility/``.
        train_loss: mean training loss of the last quarter of the steps.
        steps, lr, seed: the fine-tune's settings; ``seconds``: its wall time, evaluation included.
        cached: read from the cache in this search rather than run (not stored).

    Example:
        >>> Trial("k", "ffn", "bottom2", ["up_proj"], [1], "ok", 1.0, 0.99).label
        'ffn@bottom2'
    """

    key: str
    group: str
    window: str
    modules: list[str]
    layers: list[int]
    status: str
    speciality: float | None = None
    versatility: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train_loss: float | None = None
    steps: int = 0
    lr: float = 0.0
    seed: int = 0
    seconds: float = 0.0
    error: str | None = None
    cached: bool = False

    @property
    def label(self) -> str:
        """``"group@window"``."""
        return f"{self.group}@{self.window}"

    @property
    def ok(self) -> bool:
        """The trial ran and both scores are finite."""
        return self.status == "ok"

    def config_kwargs(self) -> dict[str, Any]:
        """The ``CoFiConfig`` arguments of the trained node."""
        return {"target_modules": list(self.modules), "layers_to_transform": list(self.layers)}

    def to_json(self) -> dict[str, Any]:
        """The cache record (without ``cached``)."""
        out = asdict(self)
        out.pop("cached")
        return {"format": CACHE_FORMAT, **out}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Trial:
        """Inverse of :meth:`to_json`; marks the trial as cached.

        Raises:
            ValueError: a field is missing or has the wrong type (a damaged or hand-edited cache line).
        """
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__ and k != "cached"}
        for name, check in _FIELD_CHECKS.items():
            if name in known and not check(known[name]):
                raise ValueError(f"field {name!r} has the wrong type ({known[name]!r})")
        missing = [n for n in ("key", "group", "window", "modules", "layers", "status") if n not in known]
        if missing:
            raise ValueError(f"fields {missing} are missing")
        return cls(**known, cached=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_FIELD_CHECKS = {
    **dict.fromkeys(("key", "group", "window", "status"), lambda v: isinstance(v, str)),
    "modules": lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v),
    "layers": lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
    **dict.fromkeys(("speciality", "versatility", "train_loss"), lambda v: v is None or _number(v)),
    **dict.fromkeys(("steps", "seed"), lambda v: isinstance(v, int) and not isinstance(v, bool)),
    **dict.fromkeys(("lr", "seconds"), _number),
    "metrics": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items()),
    "error": lambda v: v is None or isinstance(v, str),
}


class TrialCache:
    """Trials stored one JSON object per line, appended and flushed as each trial ends.

    An interrupted search leaves at most a partial last line, which :meth:`load` ignores; a later search with the
    same keys reads the finished trials instead of running them. The last record of a key wins. Other record kinds
    (calibration evaluations) reuse it by overriding ``record_format``, ``record_type`` (a class with ``key``,
    ``to_json()`` and a ``from_json(record)`` classmethod) and ``what`` (the cache's name in warnings).

    Example:
        >>> import tempfile
        >>> cache = TrialCache(os.path.join(tempfile.mkdtemp(), "trials.jsonl"))
        >>> cache.append(Trial("abc", "ffn", "bottom2", ["up_proj"], [1], "ok", 1.0, 1.0))
        >>> cache.load()["abc"].cached
        True
    """

    record_format: str = CACHE_FORMAT
    record_type: Any = Trial
    what: str = "search-cache"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any]:
        """Key -> trial for every complete, valid record; other lines are skipped (with a warning, unless it is the
        partial last line an interrupted search leaves)."""
        if not self.path.is_file():
            return {}
        out: dict[str, Trial] = {}
        lines = self.path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or record.get("format") != self.record_format:
                    raise ValueError(f"it is not a record of format {self.record_format}")
                trial = self.record_type.from_json(record)
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                if number < len(lines):  # the unterminated last line of an interrupted search is expected
                    warnings.warn(f"{self.path}:{number}: skipped a bad {self.what} line: {error}", stacklevel=2)
                continue
            out[trial.key] = trial
        return out

    def append(self, trial: Any) -> None:
        """Write one trial on a line of its own (after a partial last line, on a new one) and flush it to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as handle:  # appends go to the end whatever the read position
            size = handle.seek(0, os.SEEK_END)
            if size and handle.seek(size - 1) >= 0 and handle.read(1) != b"\n":
                handle.write(b"\n")  # the record an interrupted write left unfinished stays on its own line
            handle.write((json.dumps(trial.to_json(), sort_keys=True) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())


def fingerprint_model(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, values): equal iff the state is identical.

    Example:
        >>> fingerprint_model(torch.nn.Linear(2, 2)) == fingerprint_model(torch.nn.Linear(2, 2))
        False
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def trial_key(candidate: Candidate, **context: Any) -> str:
    """The cache key: a hash of the node's modules and layers and the ``context`` (data, seed, steps, lr, ...).

    Example:
        >>> from peft_cofi.search_space import Window
        >>> node = Candidate(("up_proj",), (1,), "up", Window(0.25, 0.5))
        >>> trial_key(node, seed=0) == trial_key(node, seed=0) != trial_key(node, seed=1)
        True
    """
    payload = {"modules": list(candidate.modules), "layers": list(candidate.layers), **context}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def evaluator_id(evaluator: Evaluator) -> str:
    """How an evaluator enters the cache key: its ``fingerprint`` attribute (built-in evaluators hash their
    batches), else its qualified name.

    Example:
        >>> def speciality(model): return 1.0
        >>> evaluator_id(speciality)
        'speciality'
    """
    fingerprint = getattr(evaluator, "fingerprint", None)
    if isinstance(fingerprint, str):
        return fingerprint
    return getattr(evaluator, "__qualname__", type(evaluator).__qualname__)


def config_id(template: CoFiConfig | None) -> str:
    """How a template config enters the cache key: its JSON without the fields a trial sets or that do not change
    training (target modules, layers, peft version, base model name, revision).

    Example:
        >>> config_id(None), "mask_mode" in config_id(CoFiConfig(mask_mode="grad"))
        ('', True)
    """
    if template is None:
        return ""
    fields = template.to_dict()
    for name in ("target_modules", "layers_to_transform", "peft_version", "base_model_name_or_path", "revision"):
        fields.pop(name, None)
    return json.dumps(fields, sort_keys=True, default=str)


def run_trial(
    base: nn.Module,
    candidate: Candidate,
    train_batches: Sequence[Batch],
    speciality: Evaluator,
    versatility: Evaluator,
    steps: int = 20,
    lr: float = 1e-4,
    seed: int = 0,
    template: CoFiConfig | None = None,
    key: str = "",
) -> Trial:
    """Fine-tune ``candidate`` on ``base`` for ``steps`` AdamW steps, evaluate, and restore ``base``.

    Batches are visited in a seeded random order (cycling when ``steps`` exceeds their number); ``torch`` is seeded
    with ``seed`` first, so a trial is reproducible. Evaluators run in eval mode under ``torch.no_grad()``. A
    non-finite loss or score makes the trial ``"failed"``
    (recorded, not raised). ``base`` leaves with its original modules, weights, ``requires_grad`` flags and mode.

    Example:
        trial = run_trial(model, node, batches, speciality, versatility, steps=20)
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0.")
    if not train_batches and steps > 0:
        raise ValueError("a trial needs at least one training batch.")
    requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
    was_training = base.training
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = get_peft_model(base, candidate.config(template))
    status, error, train_loss, scores, metrics = "ok", None, None, [None, None], {}
    try:
        train_loss, error = _fine_tune(model, train_batches, steps, lr, seed)
        if error is None:
            model.eval()
            for i, (prefix, evaluator) in enumerate((("speciality", speciality), ("versatility", versatility))):
                with torch.no_grad():
                    score, extra = _as_score(evaluator(model))
                scores[i] = score
                metrics.update({f"{prefix}/{k}": v for k, v in extra.items()})
                if not math.isfinite(score):
                    error = f"{prefix} score is {score}"
                    break
        if error is not None:
            status, scores = "failed", [None, None]
    finally:
        restored = model.unload()
        for name, parameter in restored.named_parameters():
            parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
        restored.train(was_training)
    return Trial(
        key=key,
        group=candidate.group,
        window=candidate.window.name,
        modules=list(candidate.modules),
        layers=list(candidate.layers),
        status=status,
        speciality=scores[0],
        versatility=scores[1],
        metrics=metrics,
        train_loss=train_loss,
        steps=steps,
        lr=lr,
        seed=seed,
        seconds=time.perf_counter() - started,
        error=error,
    )


def _fine_tune(
    model: nn.Module, batches: Sequence[Batch], steps: int, lr: float, seed: int
) -> tuple[float | None, str | None]:
    """A plain AdamW loop; returns (mean loss of the last quarter of the steps, error or None)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if steps == 0:
        return None, None
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    device = next(model.parameters()).device
    model.train()
    for step in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        loss = model(**model_inputs(batches[order.pop()], device)).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            return None, f"non-finite training loss ({value}) at step {step + 1}"
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
    tail = losses[-max(1, steps // 4) :]
    return sum(tail) / len(tail), None


def _as_score(result: float | Mapping[str, float]) -> tuple[float, dict[str, float]]:
    if isinstance(result, Mapping):
        if "score" not in result:
            raise ValueError(f"an evaluator returned a dict without 'score': keys {sorted(result)}.")
        return float(result["score"]), {k: float(v) for k, v in result.items()}
    return float(result), {}


class Budget:
    """Trials and seconds allowed and spent (see the module docstring for how cached trials count).

    Example:
        >>> budget = Budget(trials=2)
        >>> budget.allows_next(), budget.charge(1.5), budget.charge(2.0), budget.allows_next()
        (True, None, None, False)
    """

    def __init__(self, trials: int | None = None, seconds: float | None = None) -> None:
        if trials is not None and trials < 1:
            raise ValueError(f"budget_trials={trials} must be at least 1.")
        if seconds is not None and seconds <= 0:
            raise ValueError(f"the time budget ({seconds} s) must be positive.")
        self.trials, self.seconds = trials, seconds
        self.spent_trials, self.spent_seconds = 0, 0.0

    def allows_next(self) -> bool:
        """Whether one more trial fits: trials left, and seconds spent + mean trial time within the time budget."""
        if self.trials is not None and self.spent_trials >= self.trials:
            return False
        if self.seconds is not None and self.spent_trials:
            return self.spent_seconds + self.spent_seconds / self.spent_trials <= self.seconds
        return True

    def charge(self, seconds: float) -> None:
        """Count one trial that took ``seconds``."""
        self.spent_trials += 1
        self.spent_seconds += seconds

    def describe(self) -> str:
        """What is spent and left, for the progress bar."""
        left = "" if self.seconds is None else f", {clock(max(0.0, self.seconds - self.spent_seconds))} left"
        trials = "" if self.trials is None else f"/{self.trials}"
        return f"{self.spent_trials}{trials} trials, {clock(self.spent_seconds)} spent{left}"


def clock(seconds: float) -> str:
    """Seconds as ``m:ss``.

    Example:
        >>> clock(75.4)
        '1:15'
    """
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"
