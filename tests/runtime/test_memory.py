"""The memory plan: the same figures from a loaded model, from a checkpoint's headers, and from `dfloat inspect`;
and the plan's own rules on shapes alone."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

import dfloat
from dfloat.runtime.memory import (
    MIN_CHUNK_ROWS,
    UnitSize,
    chunk_overhang,
    chunk_rows,
    plan_checkpoint,
    plan_memory,
)

DEMO = Path(dfloat.__file__).parent / "demo" / "model"


def _same_plan(a: dict, b: dict) -> None:
    a, b = dict(a), dict(b)
    assert list(a.pop("decode_buffers").values()) == list(b.pop("decode_buffers").values())
    assert a == b


def test_checkpoint_plan_equals_loaded_plan_and_inspect():
    model = dfloat.load_compressed(DEMO, device="cpu")
    loaded = model._dfloat_plan.as_dict()
    _same_plan(plan_checkpoint(DEMO).as_dict(), loaded)
    assert loaded["chunked"] == {
        "model.embed_tokens": {"rows_per_chunk": 2176, "chunks": 2, "shape": [4096, 256]}
    }
    from dfloat.cli.main import main

    r = CliRunner().invoke(main, ["inspect", str(DEMO), "--json"])
    assert r.exit_code == 0, r.output
    _same_plan(json.loads(r.output)["memory_plan"], loaded)
    r = CliRunner().invoke(main, ["inspect", str(DEMO)])
    assert f"{loaded['pct_of_bf16']:.2f}% of BF16" in r.output and "used piecewise" in r.output


def _llama_units(vocab, hidden, ffn, layers, kv, tied, bpw_bits=10.75):
    def u(name, numel, matrix=None):
        return UnitSize(name, numel, int(numel * bpw_bits / 8), True, matrix, matrix is not None, 30_000)

    block = 2 * hidden * hidden + 2 * kv * hidden + 3 * ffn * hidden
    units = [u(f"model.layers.{i}", block) for i in range(layers)]
    units.append(u("model.embed_tokens", vocab * hidden, (vocab, hidden)))
    if not tied:
        units.append(u("lm_head", vocab * hidden, (vocab, hidden)))
    return units, block


def test_plan_rules_on_shapes():
    units, block = _llama_units(128256, 4096, 14336, 32, 1024, tied=False)
    plan = plan_memory(units, plain_bytes=0)
    assert plan.buffers == {"cpu": block}  # one block: neither vocab matrix is ever whole
    c = plan.chunked["lm_head"]
    assert c.rows % 128 == 0 and c.rows * 4096 + 2 * 30_000 + 64 <= block and len(c.chunks) == 3
    assert plan_memory(units, 0, chunking=False).buffers == {"cpu": 128256 * 4096}
    assert plan_memory(units, 0, chunk_numel=1 << 20).buffers["cpu"] == block  # blocks still decode whole
    total = plan.compressed_bytes + 2 * block
    assert plan.total_bytes == total and abs(plan.pct_of_bf16 - 100 * total / plan.bf16_bytes) < 1e-9


def test_chunks_have_a_minimum_size():
    """A vocabulary matrix just over a tiny model's block got chunks of one row (issue 19: each paying a decode
    call, the blocks of windows around it and a GEMM call for one row). Chunks now hold at least
    MIN_CHUNK_ROWS rows and at least as many weights as their overhang; the buffer grows past the budget for it."""
    block, hidden, max_block = 3 * 64 * 128, 64, 25_000  # a tiny model's MLP part; default blocks of windows
    overhang = chunk_overhang(max_block)
    layer = UnitSize("model.layers.0", block, block, True, device="cpu")

    def embed(rows):
        return UnitSize("model.embed_tokens", rows * hidden, rows, True, (rows, hidden), True, max_block)

    plan = plan_memory([layer, embed(2048)], 0)
    c = plan.chunked["model.embed_tokens"]
    assert (
        c.rows >= MIN_CHUNK_ROWS and c.rows * hidden >= overhang and c.rows % 128 == 0 and len(c.chunks) == 3
    )
    assert plan.buffers == {"cpu": c.rows * hidden + overhang}
    just_over = embed(block // hidden + 1)  # fewer rows than the minimum chunk: decoded whole
    assert plan_memory([layer, just_over], 0).chunked == {}
    assert plan_memory([layer, just_over], 0).buffers == {"cpu": just_over.numel}
    # where the budget leaves room for more, it sets the size (a multiple of 128 rows), as before
    assert chunk_rows(1 << 20, 64, 200) == (1 << 20) // 64 - 128 and chunk_rows(10_000, 64, 200) == 153
    assert chunk_rows(100, 64, 200) == MIN_CHUNK_ROWS and chunk_rows(100, 8, 40_000) == 5120


def test_readme_memory_figures_come_from_the_benchmark_json():
    root = Path(__file__).parents[2]
    rows = json.loads((root / "benchmarks" / "results" / "memory_plan.json").read_text())["rows"]
    readme = (root / "README.md").read_text()
    pct = {(r["model"], r["units"], r.get("bits_from")): r["pct_of_bf16"] for r in rows}
    for model in ("Llama-3.1-8B", "Llama-3.2-1B"):
        for units in ("block", "matrix"):
            cell = f"{pct[model, units, 'minilm']:.2f} / {pct[model, units, 'demo']:.2f}"
            assert cell in readme, (model, units, cell)


def test_checkpoint_plan_reads_each_header_entry_once(tmp_path, monkeypatch):
    """`dfloat inspect` on a checkpoint of many units: one pass over each shard's keys, not one per unit."""
    import safetensors

    from dfloat.testing import save_random_model

    save_random_model(tmp_path / "src", num_hidden_layers=24)
    dfloat.compress_model(tmp_path / "src", tmp_path / "c", unit="matrix", verify=False, allow_raw=False)
    real, counts = safetensors.safe_open, {"keys": 0, "get_slice": 0, "entries": 0}

    class Counting:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            counts["keys"] += 1
            keys = self.f.keys()
            counts["entries"] += len(keys)
            return keys

        def get_slice(self, name):
            counts["get_slice"] += 1
            return self.f.get_slice(name)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    plan = plan_checkpoint(tmp_path / "c")
    shards = len(list((tmp_path / "c").glob("dfloat-*.safetensors")))
    assert len(plan.units) > 24 * 7 and counts["keys"] == shards  # was one pass over the keys per unit
    assert counts["get_slice"] == counts["entries"]
