"""Official DFloat11 diffusion checkpoints, read into diffusers models: two layouts.

- diffusers naming (the Hub's ``DFloat11/FLUX.1-dev-DF11``, Wan, Qwen-Image releases): a folder whose
  config.json holds ``dfloat11_config`` (and no model config: the official loader fills a BF16 model the user
  built from the original repository), one ``transformer_blocks_0.safetensors``-style file per unit (the unit's
  arrays and the block's other tensors) and the rest under ``diffusion_pytorch_model*.safetensors`` (or
  everything in one ``model.safetensors``). The official loader reads every ``*.safetensors`` of the folder,
  and so does this one. The model's diffusers config comes from ``config_from``: the original model folder, a
  pipeline folder, or a Hub id (``owner/name`` with an optional ``/subfolder``); only its config.json is read.
- ComfyUI single files (FLUX in Black Forest Labs' naming: ``double_blocks.N.img_attn.qkv``,
  ``single_blocks.N``): one ``.safetensors`` with no config. The FluxTransformer2DModel config is inferred from
  the tensors (or taken from ``config_from``), and every unit member is renamed to diffusers' names; a fused
  matrix (``img_attn.qkv``, ``linear1``) is a run of consecutive rows, so its parts (``to_q``, ``to_k``,
  ``to_v``, ``proj_mlp``) are consecutive ranges of the same decoded stream, members of the unit like any other.

Either way the units are used as they are stored (official code tables and 8-byte windows) and loaded with
`dfloat.runtime.attach.attach`; ``dfloat compress`` decodes them once and writes a dfloat diffusers model
(with checksums). The writers at the end build such checkpoints from a BF16 diffusers model, for tests and
interop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch

from dfloat import df11
from dfloat.errors import ModelSourceError
from dfloat.format import Member
from dfloat.runtime.official import module_prefixes
from dfloat.runtime.source import read_json_object

log = logging.getLogger(__name__)

OFFICIAL_CONFIG = {
    "version": "0.5.0",
    "threads_per_block": [df11.OFFICIAL_THREADS_PER_BLOCK],
    "bytes_per_thread": df11.OFFICIAL_BYTES_PER_THREAD,
}

# The unit patterns of the official FLUX.1 release (diffusers naming) and of ComfyUI-DFloat11 (BFL naming).
FLUX_PATTERN = {
    r"transformer_blocks\.\d+": [
        "norm1.linear",
        "norm1_context.linear",
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.add_q_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ],
    r"single_transformer_blocks\.\d+": [
        "norm.linear",
        "proj_mlp",
        "proj_out",
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
    ],
}
# BFL name in a block -> the diffusers modules its rows hold, in order (the row counts come from the model)
_COMFY_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mod.lin": ["norm1_context.linear"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_COMFY_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
_COMFY_BLOCKS = {  # BFL block list -> (diffusers block list, member map, norm scales)
    "double_blocks": (
        "transformer_blocks",
        _COMFY_DOUBLE,
        {
            "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
            "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
            "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
            "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
        },
    ),
    "single_blocks": (
        "single_transformer_blocks",
        _COMFY_SINGLE,
        {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"},
    ),
}
COMFY_FLUX_PATTERN = {r"double_blocks\.\d+": list(_COMFY_DOUBLE), r"single_blocks\.\d+": list(_COMFY_SINGLE)}
_COMFY_TOP = {  # modules outside the blocks (weight and bias)
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) in BFL, (scale, shift) in diffusers
}
_SWAPPED = "final_layer.adaLN_modulation.1"
_COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


# ---- what a source is --------------------------------------------------------------------------------------
def is_official_diffusion(folder: Path) -> bool:
    """An official DFloat11 diffusers-naming folder: config.json with ``dfloat11_config`` whose patterns name
    diffusion blocks, or one beside diffusers' weight names."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return False
    config = read_json_object(config_path)
    if "dfloat11_config" not in config:
        return False
    if "_class_name" in config or list(folder.glob("diffusion_pytorch_model*.safetensors")):
        return True
    patterns = (config["dfloat11_config"] or {}).get("pattern_dict") or {}
    return any(re.match(r"^(single_)?transformer_blocks|^blocks|^(down|up|mid)_block", p) for p in patterns)


def is_comfyui_file(path: Path) -> bool:
    """A single ``.safetensors`` file holding official DFloat11 units (ComfyUI's diffusion model files)."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.endswith(".encoded_exponent") for k in f.keys())
    except (SafetensorError, OSError):
        return False


# ---- the model's diffusers config --------------------------------------------------------------------------
def model_config(config_from, source: Path | None = None) -> dict:
    """The diffusers config.json of the model: from ``config_from`` (a model folder, a pipeline folder whose
    ``transformer``/``unet`` it is, a config.json file, or a Hub id with an optional ``/subfolder``), else
    from ``source``'s own config.json when it has one, else from the Hub repository its model card names as
    base."""
    if config_from is None and source is not None:
        own = read_json_object(source / "config.json") if (source / "config.json").is_file() else {}
        if "_class_name" in own:
            return {k: v for k, v in own.items() if k != "dfloat11_config"}
        base = _base_model(source)
        if base is None:
            raise ModelSourceError(
                f"{source}: an official DFloat11 checkpoint stores no model config; pass config_from= "
                "(--config-from): the original model's folder or Hub id, e.g. black-forest-labs/FLUX.1-dev"
            )
        config_from = base
    path = Path(str(config_from)).expanduser()
    if path.is_file():
        return _diffusers_config(read_json_object(path), path)
    if path.is_dir():
        for sub in ("", "transformer", "unet"):
            if (path / sub / "config.json").is_file():
                config = read_json_object(path / sub / "config.json")
                if "_class_name" in config:
                    return _diffusers_config(config, path / sub / "config.json")
        raise ModelSourceError(f"{path}: holds no diffusers model config (config.json, transformer/, unet/)")
    return _hub_config(str(config_from))


def _diffusers_config(config: dict, where) -> dict:
    if "_class_name" not in config:
        raise ModelSourceError(f"{where}: not a diffusers model config (no _class_name)")
    return config


def _hub_config(spec: str) -> dict:
    parts = spec.split("/")
    if len(parts) < 2 or not all(parts):
        raise ModelSourceError(
            f"{spec}: no such folder, and not a Hub id of the form 'owner/name[/subfolder]'"
        )
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for candidate in [sub] if sub else ["transformer", "unet", ""]:
        try:
            path = hf_hub_download(repo, f"{candidate}/config.json" if candidate else "config.json")
        except LocalEntryNotFoundError as e:
            if constants.HF_HUB_OFFLINE:  # offline by choice: another place may be in the cache
                continue
            # the Hub could not be reached (after huggingface_hub's retries): neither would the other places
            raise ModelSourceError(
                f"{spec}: could not fetch its config.json from the Hub ({_first_line(e)}); pass the original "
                "model's folder instead"
            ) from None
        except EntryNotFoundError:  # not at this place: try the next
            continue
        except Exception as e:  # noqa: BLE001 - no such repository, gated, ...: one line that says so
            raise ModelSourceError(
                f"{spec}: {type(e).__name__} from the Hub ({_first_line(e)}); pass the original model's folder "
                "instead"
            ) from None
        config = read_json_object(Path(path))
        if "_class_name" in config:
            return config
    raise ModelSourceError(
        f"{spec}: no diffusers model config found on the Hub (tried {sub or 'transformer/, unet/, the root'}); "
        "pass the original model's folder instead"
    )


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _base_model(folder: Path) -> str | None:
    """The ``base_model`` an official model card names (its YAML header), if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    m = re.search(
        r"^base_model:\s*\n\s*-\s*(\S+)|^base_model:\s*(\S+)", card.read_text(errors="replace"), re.M
    )
    return (m.group(1) or m.group(2)) if m else None


def empty_model(config: dict):
    """The diffusers model of ``config`` with its parameters on the meta device."""
    from accelerate import init_empty_weights

    from dfloat.runtime.pipeline import diffusers_class

    cls = diffusers_class(config, "config")
    with init_empty_weights():
        model = cls.from_config(config)
    return model.eval()


# ---- reading -----------------------------------------------------------------------------------------------
def read_diffusers_official(folder: Path, config_from=None):
    """(diffusers config, units, plain tensors, empty model) of an official diffusers-naming folder."""
    from dfloat.runtime.official import read_official

    config = model_config(config_from, folder)
    model = empty_model(config)
    units, plain = read_official(folder, read_json_object(folder / "config.json"), model)
    return config, units, plain, model


def read_comfyui_flux(path: Path, config_from=None):
    """(diffusers config, units, plain tensors, empty model) of a ComfyUI DFloat11 FLUX file, diffusers' names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for prefix in _COMFY_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    config = model_config(config_from) if config_from is not None else infer_flux_config(tensors, path)
    model = empty_model(config)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    units, plain = {}, {}
    coded = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".encoded_exponent")})
    for unit in coded:
        block_list, index = unit.rsplit(".", 1)
        if block_list not in _COMFY_BLOCKS or not index.isdigit():
            raise ModelSourceError(f"{path}: unit {unit!r} is not a FLUX double or single block")
        target_list, members, _ = _COMFY_BLOCKS[block_list]
        target = f"{target_list}.{index}"
        arrays = {k: tensors.pop(f"{unit}.{k}") for k in df11.OFFICIAL_ARRAYS if f"{unit}.{k}" in tensors}
        bfl, renamed = [], []
        for attr, parts in members.items():
            shapes = [_shape(params, f"{target}.{p}.weight", path) for p in parts]
            cols = {s[1] for s in shapes}
            if len(cols) != 1:
                raise ModelSourceError(f"{path}: {unit}.{attr} parts have different widths {sorted(cols)}")
            bfl.append((f"{unit}.{attr}.weight", (sum(s[0] for s in shapes), cols.pop())))
            renamed += [(f"{target}.{p}.weight", s) for p, s in zip(parts, shapes)]
        ct = df11.from_official_unit(
            arrays,
            bfl,
            df11.OFFICIAL_BYTES_PER_THREAD,
            df11.OFFICIAL_THREADS_PER_BLOCK,
            where=f"{path}: unit {unit}",
        )
        out, offset = [], 0
        for name, shape in renamed:
            out.append(Member(name, shape, offset, df11.UNKNOWN_CRC))
            offset += shape[0] * shape[1]
        units[target] = dataclasses.replace(ct, members=tuple(out), _cache={})
    plain = _rename_plain_to_diffusers(tensors, params, path)
    return config, units, plain, model


def _shape(params: dict, name: str, where) -> tuple[int, ...]:
    if name not in params:
        raise ModelSourceError(f"{where}: the FLUX model built from the config has no {name}")
    return params[name]


def _rename_plain_to_diffusers(
    tensors: dict[str, torch.Tensor], params: dict, where
) -> dict[str, torch.Tensor]:
    """BFL names of the plain tensors (biases, norm scales, layers outside the blocks) -> diffusers names."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        top = _COMFY_TOP.get(module)
        if top is not None and kind in ("weight", "bias"):
            out[f"{top}.{kind}"] = _swap_halves(t) if module == _SWAPPED else t
            continue
        block_list, _, rest = name.partition(".")
        index, _, inner = rest.partition(".")
        if block_list in _COMFY_BLOCKS and index.isdigit():
            target_list, members, norms = _COMFY_BLOCKS[block_list]
            prefix = f"{target_list}.{index}"
            if inner in norms:
                out[f"{prefix}.{norms[inner]}"] = t
                continue
            attr, _, kind = inner.rpartition(".")
            if attr in members and kind == "bias":
                rows = [_shape(params, f"{prefix}.{p}.weight", where)[0] for p in members[attr]]
                for p, piece in zip(members[attr], torch.split(t, rows)):
                    out[f"{prefix}.{p}.bias"] = piece.clone()
                continue
            if attr in members and kind == "weight":
                raise ModelSourceError(
                    f"{where}: {name} is stored uncoded; only whole coded blocks are supported"
                )
        raise ModelSourceError(
            f"{where}: tensor {name!r} has no place in a FLUX model (only ComfyUI DFloat11 files of FLUX load)"
        )
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def infer_flux_config(tensors: dict[str, torch.Tensor], where) -> dict:
    """The FluxTransformer2DModel config of a BFL-named FLUX checkpoint, from its plain tensors' shapes."""

    def shape(name):
        if name not in tensors:
            raise ModelSourceError(
                f"{where}: no {name}: not a FLUX checkpoint (pass config_from= to say which)"
            )
        return tuple(tensors[name].shape)

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if head_dim != 128:
        raise ModelSourceError(
            f"{where}: attention heads of {head_dim} (not FLUX's 128): the rotary axes cannot be inferred; pass "
            "config_from= (--config-from) with the model's diffusers config"
        )
    count = {
        b: len({k.split(".")[1] for k in tensors if k.startswith(b + ".")})
        for b in ("double_blocks", "single_blocks")
    }
    out_channels = shape("final_layer.linear.weight")[0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": count["double_blocks"],
        "num_single_layers": count["single_blocks"],
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in tensors,
        "axes_dims_rope": [16, 56, 56],
    }


def read(source: Path, config_from=None):
    """(diffusers config, units, plain tensors, empty model) of either official layout."""
    if source.is_file():
        return read_comfyui_flux(source, config_from)
    return read_diffusers_official(source, config_from)


def _load_plain_as_diffusers(
    model, plain: dict[str, torch.Tensor], coded: set[str]
) -> dict[str, torch.Tensor]:
    """Plain floating tensors in BF16, except those of the class's ``_keep_in_fp32_modules`` (in float32):
    what ``from_pretrained(..., dtype=torch.bfloat16)`` makes of them."""
    keep = set(getattr(type(model), "_keep_in_fp32_modules", None) or [])
    out = {}
    for name, t in plain.items():
        if t.is_floating_point() and name not in coded:
            t = t.to(torch.float32 if keep.intersection(name.split(".")) else torch.bfloat16)
        out[name] = t
    return out


def load(source, config_from=None, device=None, backend=None, cpu_offload=False, **attach_kw):
    """An official DFloat11 diffusion checkpoint as a diffusers model (units used as stored, no BF16 copy)."""
    from dfloat.codec import canonical_device
    from dfloat.runtime.attach import attach

    source = Path(source).expanduser()
    config, units, plain, model = read(source, config_from)
    coded = {m.name for ct in units.values() for m in ct.members}
    plain = _load_plain_as_diffusers(model, plain, coded)
    device = canonical_device(
        device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    )
    attach(model, units, plain, device, backend=backend, cpu_offload=cpu_offload, **attach_kw)
    log.info(
        "loaded official DFloat11 checkpoint %s as %s: %s",
        source,
        type(model).__name__,
        model._dfloat_plan.summary(),
    )
    return model


def to_bf16_folder(source: Path, config_from, out: Path) -> Path:
    """Decode an official checkpoint into a BF16 diffusers model folder (config.json and
    diffusion_pytorch_model.safetensors, diffusers' names)."""
    from safetensors.torch import save_file

    from dfloat.codec import decompress_tensor

    config, units, tensors, _ = read(source, config_from)
    for ct in units.values():
        flat = decompress_tensor(ct, device="cpu").reshape(-1)
        tensors.update({k: v.clone() for k, v in ct.split(flat).items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out / "diffusion_pytorch_model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("decoded official DFloat11 checkpoint %s (%d units)", source, len(units))
    return out


# ---- writing (tests and interop) ---------------------------------------------------------------------------
def _read_bf16(model_folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from dfloat.runtime.pipeline import DIFFUSERS_WEIGHTS, weight_files

    tensors = {}
    for f in weight_files(model_folder, DIFFUSERS_WEIGHTS):
        tensors.update(load_file(str(f)))
    return tensors


def _official_arrays(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from dfloat.codec import compress_tensors

    return df11.to_official_unit(compress_tensors(weights, allow_raw=False))


def write_official_diffusers(
    model_folder: Path, out_dir: Path, pattern_dict: dict[str, list[str]], single_file: bool = False
) -> None:
    """A BF16 diffusers model folder written as the official tool writes it: a file per unit named after the
    module (``transformer_blocks_0.safetensors``: the unit's arrays and the block's other tensors), the rest in
    ``diffusion_pytorch_model.safetensors``, config.json holding only ``dfloat11_config``; ``single_file``:
    everything in ``model.safetensors``. The streams carry no end-of-stream code
    (dfloat.df11.to_official_unit)."""
    from safetensors.torch import save_file

    tensors = _read_bf16(model_folder)
    out_dir.mkdir(parents=True, exist_ok=False)
    blocks = sorted(
        {m for n in tensors for m in module_prefixes(n)[:-1] if any(re.fullmatch(p, m) for p in pattern_dict)}
    )
    everything = {}
    for block in blocks:
        attrs = next(a for p, a in pattern_dict.items() if re.fullmatch(p, block))
        arrays = _official_arrays({f"{block}.{a}.weight": tensors.pop(f"{block}.{a}.weight") for a in attrs})
        part = {f"{block}.{k}": v for k, v in arrays.items()}
        part.update({k: tensors.pop(k) for k in [k for k in tensors if k.startswith(block + ".")]})
        if single_file:
            everything.update(part)
        else:
            save_file(part, str(out_dir / f"{block.replace('.', '_')}.safetensors"))
    if single_file:
        save_file({**everything, **tensors}, str(out_dir / "model.safetensors"))
    else:
        save_file(tensors, str(out_dir / "diffusion_pytorch_model.safetensors"))
    (out_dir / "config.json").write_text(
        json.dumps({"dfloat11_config": {**OFFICIAL_CONFIG, "pattern_dict": pattern_dict}}, indent=2)
    )


def write_comfyui_flux(model_folder: Path, out_file: Path) -> None:
    """A BF16 FluxTransformer2DModel folder written as a ComfyUI DFloat11 file: BFL names, each double and
    single block one official unit (ComfyUI-DFloat11's patterns), everything else uncoded, in one
    ``.safetensors``."""
    from safetensors.torch import save_file

    tensors = _read_bf16(model_folder)
    out: dict[str, torch.Tensor] = {}
    for bfl_top, top in _COMFY_TOP.items():
        for kind in ("weight", "bias"):
            if f"{top}.{kind}" in tensors:
                t = tensors.pop(f"{top}.{kind}")
                out[f"{bfl_top}.{kind}"] = _swap_halves(t) if bfl_top == _SWAPPED else t
    for bfl_list, (target_list, members, norms) in _COMFY_BLOCKS.items():
        indices = sorted({int(k.split(".")[1]) for k in tensors if k.startswith(target_list + ".")})
        for i in indices:
            block, unit = f"{target_list}.{i}", f"{bfl_list}.{i}"
            weights = {}
            for attr, parts in members.items():
                weights[f"{unit}.{attr}.weight"] = torch.cat(
                    [tensors.pop(f"{block}.{p}.weight") for p in parts]
                )
                out[f"{unit}.{attr}.bias"] = torch.cat([tensors.pop(f"{block}.{p}.bias") for p in parts])
            out.update({f"{unit}.{k}": v for k, v in _official_arrays(weights).items()})
            out.update({f"{unit}.{bfl}": tensors.pop(f"{block}.{d}") for bfl, d in norms.items()})
    if tensors:
        raise ModelSourceError(f"{model_folder}: tensors with no ComfyUI FLUX name: {sorted(tensors)[:4]}")
    save_file(out, str(out_file))
