"""Gates on module outputs and a model-state guard: the machinery of an importance pass.

:class:`OutputGates` puts a gate vector of ones (``requires_grad``) on the output of each target module through a
forward hook, ``output * gate``, optionally followed by dropout drawn from its own seeded generator (the global RNG
is never touched). After ``backward()``, ``gate.grad[i]`` is the sensitivity of the loss to unit ``i``: the
gradient a multiplicative unit mask would get, the importance signal of DAS and CoFiTune. No modelling code is
copied: any module whose output is a tensor with the units on the last axis can be gated.

:func:`frozen_model_state` freezes a model for such a pass (eval mode, no parameter gradients) and restores every
module's train/eval flag, every parameter's ``requires_grad`` and ``.grad`` afterwards, also on an exception.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from peft_cofi.targets import ImportanceTarget
    >>> fc = nn.Linear(3, 2)
    >>> with frozen_model_state(fc), OutputGates([ImportanceTarget("fc", fc, 2)]) as gates:
    ...     fc(torch.ones(1, 3)).sum().backward()
    ...     grads = gates.grads()
    >>> grads["fc"].shape, fc.weight.requires_grad, fc._forward_hooks
    (torch.Size([2]), True, OrderedDict())
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .targets import ImportanceTarget


@contextmanager
def frozen_model_state(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with all parameters frozen; restore the exact previous state on exit.

    Restored: each module's ``training`` flag (mixed modes included), each parameter's ``requires_grad`` and its
    ``.grad`` tensor (the same object, untouched).

    Example:
        >>> fc = nn.Linear(2, 2).train()
        >>> with frozen_model_state(fc):
        ...     fc.training, fc.weight.requires_grad
        (False, False)
        >>> fc.training, fc.weight.requires_grad
        (True, True)
    """
    modes = [(module, module.training) for module in model.modules()]
    params = [(param, param.requires_grad, param.grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _, _ in params:
            param.requires_grad_(False)
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad, grad in params:
            param.requires_grad_(requires_grad)
            param.grad = grad


class OutputGates:
    """Context manager: multiplicative gates (and optional dropout) on the outputs of the target modules.

    Args:
        targets: the modules to gate (see :func:`peft_cofi.targets.resolve_targets`).
        dropout: probability of zeroing each gated output element (inverted dropout, applied after the gate);
            0 disables it.

    Use :meth:`reseed` before each batch to make the dropout masks a function of the seed only.

    Example:
        >>> fc = nn.Linear(3, 4)
        >>> with OutputGates([ImportanceTarget("fc", fc, 4)], dropout=0.5) as gates:
        ...     gates.reseed(0)
        ...     out = fc(torch.ones(2, 3))
        >>> int((out == 0).sum()) > 0
        True
    """

    def __init__(self, targets: Sequence[ImportanceTarget], dropout: float = 0.0) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must lie in [0, 1).")
        self.targets = list(targets)
        self.dropout = float(dropout)
        self.gates: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = 0

    def __enter__(self) -> OutputGates:
        try:
            for target in self.targets:
                device = _device_of(target.module)
                gate = torch.ones(target.units, device=device, dtype=torch.float32, requires_grad=True)
                self.gates[target.name] = gate
                self._handles.append(target.module.register_forward_hook(self._hook(target.name, gate)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def reseed(self, seed: int) -> None:
        """Restart the dropout random stream from ``seed`` (on every device)."""
        self._seed = int(seed)
        for generator in self._generators.values():
            generator.manual_seed(self._seed)

    def grads(self) -> dict[str, torch.Tensor]:
        """The gate gradients accumulated since the last :meth:`zero_grad` (zeros for a gate that got none)."""
        return {
            name: gate.grad.detach() if gate.grad is not None else torch.zeros_like(gate.detach())
            for name, gate in self.gates.items()
        }

    def zero_grad(self) -> None:
        """Drop the accumulated gate gradients."""
        for gate in self.gates.values():
            gate.grad = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def _hook(self, name: str, gate: torch.Tensor) -> Callable[[nn.Module, tuple, Any], torch.Tensor]:
        def hook(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.shape[-1] != gate.numel():
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(
                    f"cannot gate module {name!r}: expected an output tensor with {gate.numel()} units on its last "
                    f"axis, got {shape}."
                )
            out = output * gate.to(output.dtype)
            if self.dropout > 0.0:
                noise = torch.rand(out.shape, generator=self._generator(out.device), device=out.device)
                out = out * (noise >= self.dropout).to(out.dtype) / (1.0 - self.dropout)
            return out

        return hook


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
