"""Register peft-cofi with peft whenever peft is imported, so a CoFi adapter loads without ``import peft_cofi``.

``peft_cofi_autoload.pth`` (installed beside this module) imports it at interpreter start. It only installs a
finder that waits for two imports; nothing else is imported, so a program that imports neither pays one string
comparison per import:

- ``peft``: once peft has finished importing, ``peft_cofi`` is imported, which registers the ``cofi`` method with
  peft and transformers' adapter loader (see ``peft_cofi.patches``).
- ``transformers.integrations.peft``: transformers imports peft only inside ``model.load_adapter`` (also reached
  from ``AutoModel*.from_pretrained(adapter_folder)`` and ``pipeline``), too late for the registration to take part
  in that call; so ``load_adapter`` is preceded by ``import peft``, which it does anyway.

A failure to import peft_cofi is reported as a warning, never as a failed ``import peft``. Turn the whole thing off
with the environment variable ``PEFT_COFI_AUTOLOAD=0``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

ENV_VAR = "PEFT_COFI_AUTOLOAD"


def _register() -> None:
    try:
        import peft_cofi  # noqa: F401  (importing registers CoFi)
    except Exception as error:  # never turn `import peft` into a failure
        warnings.warn(f"peft-cofi could not register with peft: {error!r}", stacklevel=3)


def _import_peft_before_load_adapter(module: ModuleType) -> None:
    mixin = module.PeftAdapterMixin
    original = mixin.load_adapter

    def load_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        import peft  # noqa: F401  (registers CoFi, which wraps PeftAdapterMixin.load_adapter)

        current = mixin.load_adapter
        return (original if current is load_adapter else current)(self, *args, **kwargs)

    load_adapter.__peft_cofi_original__ = original  # peft_cofi.patches wraps the original, not this shim
    mixin.load_adapter = load_adapter


_AFTER_IMPORT = {"peft": lambda module: _register(), "transformers.integrations.peft": _import_peft_before_load_adapter}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of the modules in ``_AFTER_IMPORT`` to run a hook after them.

    ``find_spec`` is also called without importing (``importlib.util.find_spec``, as transformers' availability
    checks do), so a hook stays pending until its module has really been executed.
    """

    def __init__(self) -> None:
        self.pending = dict(_AFTER_IMPORT)
        self.resolving: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if fullname not in self.pending or fullname in self.resolving:
            return None
        self.resolving.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the spec the other finders would give
        finally:
            self.resolving.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module: ModuleType) -> None:
            exec_module(module)
            hook = self.pending.pop(fullname, None)
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)
            if hook is not None:
                hook(module)

        spec.loader.exec_module = exec_then_hook
        return spec


def install() -> None:
    """Add the finder (once), unless ``PEFT_COFI_AUTOLOAD=0``."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
