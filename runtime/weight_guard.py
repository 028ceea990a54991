"""Refusing what would use coded weights outside their modules' forward, where they hold another unit's bits.

A coded weight is a view of the shared decode buffer (runtime/decode_hooks.py): right only while its module runs.
Code that reads it at another time gets whatever unit was decoded last, and what it writes there is overwritten
by the next decode; either way the model silently computes with other weights. So:

- ``copy.deepcopy`` of a module holding coded weights (PEFT's ``modules_to_save`` copies the module it trains)
  raises: the copy's weights would be a snapshot of the buffer, and the hooks would go on decoding into the
  original's.
- A model with PEFT adapters (``model.peft_config``, set by ``get_peft_model`` / ``load_lora_weights``) is checked
  before its first forward and whenever its adapters change. Refused on modules holding coded weights:
  adapter layers other than plain LoRA (DoRA and other LoRA variants, trainable tokens, other PEFT methods),
  initialisations from the base weights (``init_lora_weights`` other than True, False, "gaussian",
  "orthogonal" and "eva": PiSSA, OLoRA, CorDA, LoftQ, MiCA read the weights and some change them), and
  adapters merged into the weights (``merge_adapter``). ``merge_and_unload`` leaves nothing to check: use
  `dfloat.export_merged`.
"""

from __future__ import annotations

import functools

import torch

from dfloat.errors import DFloatError

# init_lora_weights values that never read the base weights (PEFT's LoraLayer.update_layer)
SAFE_LORA_INITS = (True, False, "gaussian", "orthogonal", "eva")
ADVICE = "decompress the model first (`dfloat decompress`) to train it that way"


def _refuse_deepcopy(name: str, memo) -> None:
    raise DFloatError(
        f"{name}: holds compressed weights, which cannot be copied (copy.deepcopy; PEFT's modules_to_save "
        f"copies the modules it trains): the copy would not decode them. Leave it out of modules_to_save, or "
        f"{ADVICE}"
    )


def install(model: torch.nn.Module, places) -> None:
    """Guard ``model``, whose coded weights live at ``places`` ((module, attribute) pairs)."""
    names = {id(m): n for n, m in model.named_modules()}
    for module, _ in places:
        module._dfloat_coded = True
        module.__deepcopy__ = functools.partial(
            _refuse_deepcopy, names.get(id(module)) or type(module).__name__
        )
    if not getattr(model, "_dfloat_peft_guarded", False):
        model.register_forward_pre_hook(_check_adapters)
        model._dfloat_peft_guarded = True


def _check_adapters(model, args) -> None:
    configs = model.__dict__.get("peft_config")
    if not configs:
        return
    key = (id(configs), tuple(configs))
    seen = model.__dict__.get("_dfloat_peft_checked")
    if seen is None or seen[0] != key:
        seen = (key, check_adapters(model, configs))
        model._dfloat_peft_checked = seen
    for name, layer in seen[1]:
        if getattr(layer, "merged", False):
            raise DFloatError(
                f"{name}: PEFT adapters merged into compressed weights (merge_adapter) would be lost at the next "
                "decode: call unmerge_adapter() to run them unmerged; dfloat.export_merged writes a merged model"
            )


def check_adapters(model: torch.nn.Module, configs) -> list[tuple[str, torch.nn.Module]]:
    """Refuse PEFT set-ups that read or change coded weights outside a forward; returns the adapter layers on
    modules holding coded weights (named), whose merge state is checked at every forward."""
    for adapter, config in configs.items():
        init = getattr(config, "init_lora_weights", True)
        if not any(init is ok or (isinstance(ok, str) and init == ok) for ok in SAFE_LORA_INITS):
            raise DFloatError(
                f"PEFT adapter {adapter!r}: init_lora_weights={init!r} reads (and may change) the base weights "
                f"when the adapter is made, but a compressed model's weights are decoded only while their "
                f"module runs; use the default initialisation, or {ADVICE}"
            )
    layers = []
    for name, module in model.named_modules():
        get_base = getattr(module, "get_base_layer", None)
        if get_base is None or module is get_base() or not getattr(get_base(), "_dfloat_coded", False):
            continue
        kind = type(module).__name__
        variants = {a for a, v in getattr(module, "lora_variant", {}).items() if v is not None}
        variants |= {a for a, on in getattr(module, "use_dora", {}).items() if on}
        if not hasattr(module, "lora_A") or variants:
            what = f"DoRA or another LoRA variant (adapter(s) {sorted(variants)})" if variants else kind
            raise DFloatError(
                f"{name}: PEFT's {what} on compressed weights is not supported: it reads the base weights outside "
                f"the module's forward (plain LoRA adapters are supported); {ADVICE}"
            )
        layers.append((name, module))
    return layers
