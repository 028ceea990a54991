"""Makes an installed dfloat known to transformers and diffusers without `import dfloat`: run at interpreter
start by ``dfloat-autoload.pth`` (installed beside the package), it only adds an import hook, importing nothing.

Once transformers or diffusers has imported one of these packages (and no module of either is still
half-imported), the hook runs dfloat's registration:

- ``transformers.quantizers``: registers the ``dfloat`` quant method (dfloat.runtime.hf_quantizer), so
  ``from_pretrained`` loads dfloat checkpoints;
- ``transformers.models.auto``: registers the four research architectures (dfloat.models)
  with AutoConfig / AutoModel / AutoModelForCausalLM;
- ``diffusers.quantizers``: registers the ``dfloat`` quant method with diffusers
  (dfloat.runtime.diffusers_quantizer), so diffusers models and pipelines load dfloat checkpoints.

A failure inside the hook is logged and never breaks the import. ``DFLOAT_NO_AUTOLOAD=1`` turns the
hook off (then ``import dfloat.runtime.hf_quantizer``, ``import dfloat.runtime.diffusers_quantizer`` and
``import dfloat.models`` do it by hand). This file must stay importable without torch, transformers or diffusers:
it runs in every Python of the environment.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys

_AFTER = {
    "transformers.quantizers": ("dfloat.runtime.hf_quantizer", "register"),
    "transformers.models.auto": ("dfloat.models", "register_auto_classes"),
    "diffusers.quantizers": ("dfloat.runtime.diffusers_quantizer", "register"),
}
_ROOTS = tuple(sorted({target.split(".")[0] for target in _AFTER}))  # the packages whose imports are tracked


_pending = dict(_AFTER)
_depth = 0  # tracked modules executing right now (imports nest)


def _run(target: str) -> None:
    module_name, func = _AFTER[target]
    if module_name in sys.modules:  # being imported (or imported): it registers itself when its import ends
        return
    try:
        import importlib

        getattr(importlib.import_module(module_name), func)()
    except Exception as e:  # noqa: BLE001 - never break `import transformers` or `import diffusers`
        logging.getLogger("dfloat").warning(
            "dfloat: could not register with %s (%s: %s)", target.split(".")[0], type(e).__name__, e
        )


def _register_ready() -> None:
    """Registers once its trigger package is imported and no tracked module is half-initialized (an import chain
    inside transformers or diffusers is complete), so registering cannot meet a circular import."""
    if _depth:
        return
    for target in [t for t in _pending if t in sys.modules]:
        del _pending[target]
        _run(target)


class _Tracked(importlib.abc.Loader):
    """Wraps a tracked module's own loader to know when its import chain is complete."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        global _depth
        _depth += 1
        try:
            self._inner.exec_module(module)
        finally:
            _depth -= 1
        _register_ready()

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if not _pending or name.split(".")[0] not in _ROOTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Tracked(spec.loader)
        return spec


def install() -> None:
    """Add the hook (once). If transformers or diffusers was imported already, register now."""
    if os.environ.get("DFLOAT_NO_AUTOLOAD") == "1" or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    _register_ready()


install()
