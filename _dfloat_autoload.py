"""Makes an installed dfloat known to transformers and diffusers without `import dfloat`: run at interpreter
start by ``dfloat-autoload.pth`` (installed beside the package), it only adds an import hook, importing nothing.

Once transformers or diffusers has imported one of these modules (and no module of either is still
half-imported), the hook registers dfloat:

- ``transformers.quantizers`` (imported with transformers' modeling code): imports dfloat.runtime.hf_quantizer,
  which registers the ``dfloat`` quant method, so ``from_pretrained`` loads dfloat checkpoints;
- ``transformers.models.auto.configuration_auto`` (AutoConfig's module, imported by every Auto class,
  ``AutoTokenizer`` included): makes the research architectures' model types ("polycom", "masformer",
  "nextlat", "bottlenecked") known to AutoConfig without importing anything. The first time transformers looks
  one of them up (``AutoConfig`` / ``AutoModel*.from_pretrained`` on such a folder, a pipeline), dfloat.models
  is imported and registers its classes with AutoConfig / AutoModel / AutoModelForCausalLM. So
  ``from transformers import AutoTokenizer`` imports nothing more than without dfloat
  (tests/runtime/test_transformers_integration.py; benchmarks/autoload_cost.py measures the time);
- ``diffusers.quantizers``: imports dfloat.runtime.diffusers_quantizer, which registers the ``dfloat`` quant
  method with diffusers, so diffusers models and pipelines load dfloat checkpoints.

A failure inside the hook is logged and never breaks the import. ``DFLOAT_NO_AUTOLOAD=1`` turns the
hook off (then ``import dfloat.runtime.hf_quantizer``, ``import dfloat.runtime.diffusers_quantizer`` and
``import dfloat.models`` do it by hand). This file must stay importable without torch, transformers or diffusers:
it runs in every Python of the environment.
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import os
import sys

# Model types of dfloat.models (a test checks this equals dfloat.models.ARCHITECTURES) -> the module registering them
ARCHITECTURE_MODULES = dict.fromkeys(("polycom", "masformer", "nextlat", "bottlenecked"), "dfloat.models")


def _warn(library: str, e: Exception) -> None:
    logging.getLogger("dfloat").warning(
        "dfloat: could not register with %s (%s: %s)", library, type(e).__name__, e
    )


class _RegistersOnLookup(dict):
    """Stands in for the dict behind transformers' AutoConfig registry of added model types
    (``CONFIG_MAPPING._extra_content``, which ``AutoConfig.register`` fills): looking up one of dfloat's model
    types imports the module that registers it (into this very dict) first."""

    def __init__(self, existing: dict, pending: dict[str, str]):
        super().__init__(existing)
        self.pending = dict(pending)

    def _load(self, key) -> None:
        module = self.pending.get(key) if isinstance(key, str) else None
        if module is None or dict.__contains__(self, key):
            return
        for k in [k for k, m in self.pending.items() if m == module]:  # one import registers all its types
            del self.pending[k]
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - then transformers reports the model type as unknown
            _warn("transformers", e)

    def __contains__(self, key) -> bool:
        self._load(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key):
        self._load(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._load(key)
        return dict.get(self, key, default)


def _register_architectures_lazily() -> None:
    if "dfloat.models" in sys.modules:  # imported (or being imported): it registers itself
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    extra = CONFIG_MAPPING._extra_content
    if not isinstance(extra, _RegistersOnLookup):
        CONFIG_MAPPING._extra_content = _RegistersOnLookup(extra, ARCHITECTURE_MODULES)


def _register_quant_method(module: str):
    """What registers the quant method with one library: importing ``module`` and calling its ``register``."""

    def register() -> None:
        if module in sys.modules:  # imported (or being imported): it registers itself
            return
        importlib.import_module(module).register()

    return register


_AFTER = {
    "transformers.quantizers": _register_quant_method("dfloat.runtime.hf_quantizer"),
    "transformers.models.auto.configuration_auto": _register_architectures_lazily,
    "diffusers.quantizers": _register_quant_method("dfloat.runtime.diffusers_quantizer"),
}
_ROOTS = tuple(sorted({target.split(".")[0] for target in _AFTER}))  # the packages whose imports are tracked


_pending = dict(_AFTER)
_depth = 0  # tracked modules executing right now (imports nest)


def _run(target: str) -> None:
    try:
        _AFTER[target]()
    except Exception as e:  # noqa: BLE001 - never break `import transformers` or `import diffusers`
        _warn(target.split(".")[0], e)


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
