"""`from_pretrained` on dfloat checkpoints: the installed package registers itself, outputs equal BF16's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfloat
from dfloat.testing import save_random_model

DEMO = Path(dfloat.__file__).parent / "demo" / "model"


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """A fresh interpreter of this environment (its .pth files run): what a user's script sees."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    save_random_model(root / "bf16", trained_scale=True, seed=1, tie_word_embeddings=True)
    dfloat.compress_model(root / "bf16", root / "dfloat")
    return root


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The bundled PolyCom demo (a research architecture, with a tokenizer) as BF16 and compressed again."""
    root = tmp_path_factory.mktemp("demo")
    dfloat.decompress_model(DEMO, root / "bf16")
    dfloat.compress_model(root / "bf16", root / "dfloat")
    return root


def test_startup_hook_is_installed_and_imports_nothing():
    """dfloat-autoload.pth runs in every interpreter of the environment: it must not import torch or transformers."""
    run = _python(
        "import sys; print(*(m in sys.modules for m in ('_dfloat_autoload', 'dfloat', 'torch', 'transformers')))"
    )
    assert run.stdout.split() == ["True", "False", "False", "False"], run.stderr


def test_importing_transformers_auto_classes_imports_nothing_of_dfloat(tmp_path):
    """The hook used to import dfloat.models, and with it transformers' modeling code, whenever a program
    imported an Auto class (`from transformers import AutoTokenizer`; benchmarks/results/autoload_cost_eager.json).
    Now the modules a program imports are the same with and without it (benchmarks/autoload_cost.py measures
    the time). Importing transformers' modeling code (a model class, `pipeline`) still registers the quant
    method (autoload_cost_pipeline.json)."""
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer, AutoConfig, AutoModelForCausalLM\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    on, off = (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
        )
        for env in (os.environ, {**os.environ, "DFLOAT_NO_AUTOLOAD": "1"})
    )  # run outside the repository: its kernels/ folder would shadow the `kernels` package transformers may import
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    on, off = set(json.loads(on.stdout)), set(json.loads(off.stdout))
    assert on == off, sorted(on ^ off)[:20]
    assert "transformers.modeling_utils" not in on and not any(m.split(".")[0] == "dfloat" for m in on)


def test_research_model_types_register_on_first_lookup():
    import _dfloat_autoload
    from dfloat.models import ARCHITECTURES

    assert set(_dfloat_autoload.ARCHITECTURE_MODULES) == set(ARCHITECTURES)
    code = f"""
import sys
from transformers import AutoConfig, PretrainedConfig
assert "dfloat.models" not in sys.modules
config = AutoConfig.from_pretrained({str(DEMO)!r})
print(type(config).__name__, "dfloat.models" in sys.modules)
class MyConfig(PretrainedConfig):
    model_type = "my-own"
AutoConfig.register("my-own", MyConfig)  # other registrations still work beside dfloat's
print(type(AutoConfig.for_model("my-own")).__name__, "masformer" in AutoConfig.for_model("masformer").model_type)
"""
    run = _python(code)
    assert run.stdout.split() == ["PolyComConfig", "True", "MyConfig", "True"], run.stderr[-2000:]


def test_compress_model_writes_quant_method_and_one_index(llama):
    config = json.loads((llama / "dfloat" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "dfloat"
    index = json.loads((llama / "dfloat" / "dfloat.safetensors.index.json").read_text())
    assert sorted(index["weight_map"].values())[0].startswith("dfloat-00001-of-")
    assert not (llama / "dfloat" / "dfloat.index.json").exists()  # one index: dfloat and transformers read it
    assert not list((llama / "dfloat").glob("model*.safetensors*"))


def test_from_pretrained_logits_and_generate_equal_bf16(llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama / "dfloat", device_map="cpu", low_cpu_mem_usage=True)
    ref = AutoModelForCausalLM.from_pretrained(llama / "bf16", dtype=torch.bfloat16)
    assert model.is_quantized and model.dtype == torch.bfloat16
    assert model._dfloat_units and all(p.requires_grad is False for p in model.parameters())
    ids = torch.tensor([[5, 9, 2, 77, 31]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_from_pretrained_forces_bf16(llama, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama / "dfloat", dtype=torch.float32)
    assert model.dtype == torch.bfloat16
    assert "ignoring dtype=torch.float32" in caplog.text


def test_save_pretrained_refuses_clearly(llama, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama / "dfloat")
    with pytest.raises(ValueError, match="dfloat"):
        model.save_pretrained(tmp_path / "out")
    assert "dfloat decompress" in caplog.text
    assert not (tmp_path / "out").exists()


def test_script_without_import_dfloat_runs_research_architecture_and_pipeline(demo):
    """A user's script: no `import dfloat`, a research architecture, pipeline and from_pretrained."""
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, pipeline
model = AutoModelForCausalLM.from_pretrained({str(demo / "dfloat")!r})
ref = AutoModelForCausalLM.from_pretrained({str(demo / "bf16")!r})
ids = torch.tensor([[3, 14, 15, 92, 65]])
with torch.no_grad():
    assert torch.equal(model(ids).logits, ref(ids).logits)
assert type(model).__name__ == "PolyComForCausalLM" and model._dfloat_units
out = pipeline("text-generation", model={str(demo / "dfloat")!r})("Once upon a time", max_new_tokens=12, do_sample=False)
want = pipeline("text-generation", model={str(demo / "bf16")!r})("Once upon a time", max_new_tokens=12, do_sample=False)
assert out == want, (out, want)
print("OK", "dfloat.models" in sys.modules)
"""
    run = _python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["OK", "True"]


def test_without_dfloat_registered_transformers_names_the_quant_method(llama):
    code = f"""
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(llama / "dfloat")!r})
except OSError as e:
    print("OSError", e)
"""
    run = _python(code, DFLOAT_NO_AUTOLOAD="1", TRANSFORMERS_VERBOSITY="warning")
    assert "Unknown quantization type, got dfloat" in run.stderr
    assert run.stdout.startswith("OSError") and "model.safetensors" in run.stdout


def test_hub_id_loads_through_huggingface_hub_cache(llama, tmp_path):
    """`from_pretrained("owner/name")` with huggingface_hub pointed at a local cache folder (no network)."""
    import shutil

    snapshot = tmp_path / "hub" / "models--someone--tiny-dfloat" / "snapshots" / ("a" * 40)
    shutil.copytree(llama / "dfloat", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("someone/tiny-dfloat")
ref = AutoModelForCausalLM.from_pretrained({str(llama / "bf16")!r}, dtype=torch.bfloat16)
ids = torch.tensor([[1, 2, 3]])
with torch.no_grad():
    assert torch.equal(model(ids).logits, ref(ids).logits)
print("OK", type(model.hf_quantizer).__name__)
"""
    run = _python(code, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["OK", "DFloatHfQuantizer"]


@pytest.mark.gpu
def test_from_pretrained_device_map_cuda_equals_bf16(llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama / "dfloat", device_map="cuda")
    ref = AutoModelForCausalLM.from_pretrained(llama / "bf16", dtype=torch.bfloat16, device_map="cuda")
    ids = torch.tensor([[5, 9, 2, 77, 31]], device="cuda")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_all_four_research_architectures_load_without_import_dfloat_models(tmp_path):
    from dfloat.models.testing import ARCHS, tiny_model

    for arch in ARCHS:
        tiny_model(arch).to(torch.bfloat16).save_pretrained(tmp_path / arch / "bf16")
        dfloat.compress_model(tmp_path / arch / "bf16", tmp_path / arch / "dfloat", allow_raw=False)
    code = f"""
import torch
from transformers import AutoModelForCausalLM
ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
for arch in {ARCHS!r}:
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + f"/{{arch}}/dfloat")
    ref = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + f"/{{arch}}/bf16", dtype=torch.bfloat16)
    assert model._dfloat_units and type(model) is type(ref), arch
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits), arch
    print(type(model).__name__)
"""
    run = _python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [
        "PolyComForCausalLM",
        "MASFormerForCausalLM",
        "NextLatForCausalLM",
        "BottleneckedForCausalLM",
    ]
