"""The coarse-level search space: module groups x layer windows, and how a node is refined.

*Module groups* are named sets of roles (``q k v o`` attention projections, ``up gate down`` FFN projections):

=============== =========================== =====================================
group           roles                       Llama-like modules
=============== =========================== =====================================
``attn_qkv``    q, k, v                     q_proj, k_proj, v_proj
``attn``        q, k, v, o                  + o_proj
``ffn_up_down`` up, down                    up_proj, down_proj (the paper's pick)
``ffn``         up, gate, down              + gate_proj
``attn_ffn``    all seven                   all of the above
=============== =========================== =====================================

Roles map to module names per architecture (:data:`peft_cofi.selection.ARCH_MODULE_ROLES`); a fused module
(GPT-2's ``c_attn`` holds q, k and v) belongs to a group only when all its roles do. A group that an architecture
cannot form exactly (a fused module straddles it, or none of its modules exists) is skipped with a note; one that
gives the same modules as an earlier group (GPT-2 and OPT have no ``gate``, so ``ffn`` = ``ffn_up_down``) is merged
into it, also with a note.

*Windows* are depth-fraction ranges ``[a, b)`` (:mod:`peft_cofi.windows`). The tree: the full depth's children are
the three half-depth windows (``bottom-plus``, ``middle-plus``, ``top-plus``); every other window's children are its
two halves, so depth 2 holds the paper's quarters (``bottom1``, ``bottom2``, ``middle``, ``top``) and deeper levels
eighths (``"0.25:0.375"``) and so on. A node is identified by the layer indices it resolves to, so windows that
resolve to the same layers of a shallow model are one node.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=8,
    ...                                      num_attention_heads=2, vocab_size=50))
    >>> space = SearchSpace.from_model(model)
    >>> [c.label for c in space.first_level()][:3]
    ['attn@bottom-plus', 'attn@middle-plus', 'attn@top-plus']
    >>> node = space.candidate("ffn", Window(0.0, 0.5))
    >>> [c.label for c in space.narrower(node)]
    ['ffn@bottom1', 'ffn@bottom2']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import CoFiConfig
from .layer import SUPPORTED_LAYERS
from .selection import ARCH_MODULE_ROLES, LAYER_COUNT_KEYS, ROLES
from .windows import NAMED_WINDOWS, window_layers

MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_qkv": ("q", "k", "v"),
    "attn": ("q", "k", "v", "o"),
    "ffn_up_down": ("up", "down"),
    "ffn": ("up", "gate", "down"),
    "attn_ffn": ROLES,
}
# Compared on the half-depth windows first: attention, FFN, both. The finer groups come in as refinements.
FIRST_LEVEL_GROUPS = ("attn", "ffn", "attn_ffn")


@dataclass(frozen=True, order=True)
class Window:
    """A depth window ``[start, end)`` as fractions of the model's depth.

    Example:
        >>> Window(0.25, 0.5).name, Window(0.25, 0.375).name
        ('bottom2', '0.25:0.375')
        >>> Window(0.25, 0.5).layers(30)
        (8, 9, 10, 11, 12, 13, 14)
    """

    start: float
    end: float

    @property
    def name(self) -> str:
        """The paper's name of the window if it has one, else ``"start:end"`` (a valid ``layers_to_transform``)."""
        for name, bounds in NAMED_WINDOWS.items():
            if bounds == (self.start, self.end):
                return name
        return f"{self.start:g}:{self.end:g}"

    @property
    def depth(self) -> int:
        """0 for the full depth, 1 for half-depth windows, 2 for quarters, ..."""
        return max(0, round(-math.log2(self.end - self.start)))

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The layer indices ``i`` with ``start * L <= i < end * L`` (as :func:`peft_cofi.windows.resolve_layers`)."""
        return tuple(window_layers(self.start, self.end, num_layers))

    def children(self) -> tuple[Window, ...]:
        """The narrower windows one level down: the three half-depth windows of the full depth, else the halves.

        Example:
            >>> [w.name for w in Window(0.0, 1.0).children()]
            ['bottom-plus', 'middle-plus', 'top-plus']
        """
        if (self.start, self.end) == (0.0, 1.0):
            return (Window(0.0, 0.5), Window(0.25, 0.75), Window(0.5, 1.0))
        middle = (self.start + self.end) / 2
        return (Window(self.start, middle), Window(middle, self.end))


FULL_DEPTH = Window(0.0, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One node of the search: which modules train in which layers.

    Attributes:
        modules: module names (dotted suffixes, as ``target_modules``), sorted.
        layers: layer indices, sorted.
        group: the module group's name (or ``"a+b"`` for a subset that is no named group).
        window: the window the node was reached by.

    Example:
        >>> c = Candidate(("down_proj", "up_proj"), (1,), "ffn_up_down", Window(0.25, 0.5))
        >>> c.label, c.config_kwargs()
        ('ffn_up_down@bottom2', {'target_modules': ['down_proj', 'up_proj'], 'layers_to_transform': [1]})
    """

    modules: tuple[str, ...]
    layers: tuple[int, ...]
    group: str = field(compare=False)
    window: Window = field(compare=False)

    @property
    def label(self) -> str:
        """``"group@window"``, e.g. ``"ffn_up_down@bottom2"``."""
        return f"{self.group}@{self.window.name}"

    def config_kwargs(self) -> dict[str, Any]:
        """The ``CoFiConfig`` arguments that select this node (explicit layer indices)."""
        return {"target_modules": list(self.modules), "layers_to_transform": list(self.layers)}

    def config(self, template: CoFiConfig | None = None) -> CoFiConfig:
        """A fresh :class:`CoFiConfig` for this node; other fields (mask mode, importance, ...) from ``template``.

        Example:
            >>> Candidate(("fc1",), (0, 1), "up", FULL_DEPTH).config().layers_to_transform
            [0, 1]
        """
        fields: dict[str, Any] = {}
        if template is not None:
            fields = {name: getattr(template, name) for name in template.__dataclass_fields__ if name != "peft_type"}
        return CoFiConfig(**{**fields, **self.config_kwargs()})


class SearchSpace:
    """The module groups an architecture supports and the window tree, for one model depth.

    Args:
        model_type: ``config.model_type`` (picks :data:`ARCH_MODULE_ROLES`), unless ``module_roles`` is given.
        num_layers: the model's depth.
        module_roles: module name -> roles (one of :data:`ROLES` or a tuple), for architectures without a table.
        module_names: all module names of the model; when given, modules that do not exist are dropped (noted).
        first_level_groups: the groups compared on the half-depth windows.
        leave_one_out: module refinement also tries the node's module set minus one module (else named subgroups
            only).
        max_window_depth: do not narrow windows below this depth (2 = the paper's quarters); ``None``: no limit.

    Example:
        >>> space = SearchSpace("gpt2", 4)
        >>> space.groups["ffn_up_down"], space.notes[0]
        (('mlp.c_fc', 'mlp.c_proj'), "ffn: gpt2 has the same modules as 'ffn_up_down' (no gate projection)")
    """

    def __init__(
        self,
        model_type: str,
        num_layers: int,
        module_roles: Mapping[str, str | Sequence[str]] | None = None,
        module_names: Sequence[str] | None = None,
        first_level_groups: Sequence[str] = FIRST_LEVEL_GROUPS,
        leave_one_out: bool = True,
        max_window_depth: int | None = None,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1.")
        if module_roles is None:
            if model_type not in ARCH_MODULE_ROLES:
                raise ValueError(
                    f"no module-group table for model_type={model_type!r}; pass module_roles (module name -> role, "
                    f"roles {ROLES}). Known architectures: {sorted(ARCH_MODULE_ROLES)}."
                )
            module_roles = ARCH_MODULE_ROLES[model_type]
        self.model_type, self.num_layers = model_type, num_layers
        self.leave_one_out, self.max_window_depth = leave_one_out, max_window_depth
        self.notes: list[str] = []
        self.module_roles = self._check_roles(module_roles, module_names)
        self.groups: dict[str, tuple[str, ...]] = {}
        self.aliases: dict[str, str] = {}
        for name, roles in MODULE_GROUPS.items():
            self._add_group(name, roles)
        unknown = [g for g in first_level_groups if g not in MODULE_GROUPS]
        if unknown:
            raise ValueError(f"unknown module groups {unknown}; known: {list(MODULE_GROUPS)}.")
        names = [self.aliases.get(g, g) for g in first_level_groups]
        self.first_level_groups = tuple(dict.fromkeys(g for g in names if g in self.groups))
        if not self.first_level_groups:
            raise ValueError(f"none of the groups {list(first_level_groups)} exists in {model_type}: {self.notes}")

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> SearchSpace:
        """The space of a transformers model: its ``model_type``, depth and module names.

        Example:
            SearchSpace.from_model(model).num_layers
            30
        """
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None) or type(model).__name__
        counts = [getattr(config, k) for k in LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int)]
        if not counts:
            raise ValueError(
                f"cannot tell the depth of {type(model).__name__}: its config has none of {LAYER_COUNT_KEYS}."
            )
        num_layers = counts[0]
        names = [name for name, module in model.named_modules() if isinstance(module, SUPPORTED_LAYERS)]
        return cls(model_type, num_layers, module_names=names, **kwargs)

    # --- nodes ---

    def candidate(self, group: str | Sequence[str], window: Window) -> Candidate | None:
        """The node for a group name (or an explicit module list) in a window; ``None`` if the window is empty.

        Example:
            >>> SearchSpace("llama", 4).candidate("ffn_up_down", Window(0.25, 0.5)).layers
            (1,)
        """
        if isinstance(group, str):
            name = self.aliases.get(group, group)
            if name not in self.groups:
                raise ValueError(f"group {group!r} is not available for {self.model_type}: {self.notes}")
            modules = self.groups[name]
        else:
            modules = tuple(sorted(group))
            name = self.group_name(modules)
        layers = window.layers(self.num_layers)
        return Candidate(modules, layers, name, window) if layers else None

    def group_name(self, modules: Sequence[str]) -> str:
        """The first named group with exactly these modules, else the modules joined by ``+``."""
        wanted = tuple(sorted(modules))
        return next((g for g, mods in self.groups.items() if mods == wanted), "+".join(wanted))

    def first_level(self) -> list[Candidate]:
        """The first-level groups on the half-depth windows, group by group."""
        nodes = [self.candidate(g, w) for g in self.first_level_groups for w in FULL_DEPTH.children()]
        return distinct_nodes([n for n in nodes if n is not None])

    def narrower(self, node: Candidate) -> list[Candidate]:
        """The same modules in each child window that holds layers and differs from the node's layers."""
        if self.max_window_depth is not None and node.window.depth >= self.max_window_depth:
            return []
        nodes = [self.candidate(node.modules, w) for w in node.window.children()]
        return distinct_nodes([n for n in nodes if n is not None and n.layers != node.layers])

    def module_subsets(self, node: Candidate) -> list[Candidate]:
        """The same window with fewer modules: named groups strictly inside the node's modules, then (with
        ``leave_one_out``) the node's modules minus one."""
        current = set(node.modules)
        subsets = [mods for mods in self.groups.values() if set(mods) < current]
        if self.leave_one_out and len(current) > 1:
            subsets += [tuple(sorted(current - {m})) for m in sorted(current)]
        nodes = [self.candidate(mods, node.window) for mods in subsets]
        return distinct_nodes([n for n in nodes if n is not None])

    def enumerate(self, max_window_depth: int = 2) -> list[Candidate]:
        """Every named group in every window of depth 1..``max_window_depth`` (the exhaustive comparison space;
        depth 2 = the paper's seven windows).

        Example:
            >>> len(SearchSpace("llama", 8).enumerate(2))
            35
        """
        windows, level = [], [FULL_DEPTH]
        for _ in range(max_window_depth):
            level = list(dict.fromkeys(child for w in level for child in w.children()))
            windows += level
        nodes = [self.candidate(g, w) for g in self.groups for w in windows]
        return distinct_nodes([n for n in nodes if n is not None])

    # --- construction ---

    def _check_roles(
        self, module_roles: Mapping[str, str | Sequence[str]], module_names: Sequence[str] | None
    ) -> dict[str, frozenset[str]]:
        out = {}
        for module, roles in module_roles.items():
            roles = frozenset([roles] if isinstance(roles, str) else roles)
            if not roles or not roles <= set(ROLES):
                raise ValueError(f"module {module!r} has roles {sorted(roles)}; each must be one of {ROLES}.")
            if module_names is not None and not any(n == module or n.endswith("." + module) for n in module_names):
                self.notes.append(f"{module}: no such adaptable module in this {self.model_type} model; skipped")
                continue
            out[module] = roles
        return out

    def _add_group(self, name: str, roles: tuple[str, ...]) -> None:
        wanted = set(roles)
        straddling = [m for m, r in self.module_roles.items() if r & wanted and not r <= wanted]
        if straddling:
            self.notes.append(f"{name}: skipped, {self.model_type} fuses {straddling} with roles outside the group")
            return
        modules = tuple(sorted(m for m, r in self.module_roles.items() if r <= wanted))
        if not modules:
            self.notes.append(f"{name}: skipped, {self.model_type} has none of its modules")
            return
        same = next((g for g, mods in self.groups.items() if mods == modules), None)
        if same is not None:
            missing = sorted(wanted - set().union(*(self.module_roles[m] for m in modules)))
            self.notes.append(
                f"{name}: {self.model_type} has the same modules as {same!r} (no {'/'.join(missing)} projection)"
            )
            self.aliases[name] = same
            return
        self.groups[name] = modules


def distinct_nodes(nodes: Sequence[Candidate]) -> list[Candidate]:
    """Drop nodes with the same modules and layers as an earlier one, keeping the order.

    Example:
        >>> node = Candidate(("fc1",), (0,), "up", FULL_DEPTH)
        >>> len(distinct_nodes([node, Candidate(("fc1",), (0,), "other", Window(0.0, 0.5))]))
        1
    """
    seen: set[tuple[tuple[str, ...], tuple[int, ...]]] = set()
    out = []
    for node in nodes:
        if (node.modules, node.layers) not in seen:
            seen.add((node.modules, node.layers))
            out.append(node)
    return out
