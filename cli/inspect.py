"""dfloat inspect PATH: per-unit sizes next to the entropy bound."""

from __future__ import annotations

import json

import click


def unit_rows(path: str) -> list[dict]:
    import numpy as np
    import torch

    from dfloat.codec import decompress_tensor
    from dfloat.runtime.checkpoint import CompressedCheckpoint

    rows = []
    for _, units, _ in CompressedCheckpoint.open(path).iter_shards():
        for name, ct in units.items():
            row = {
                "unit": name,
                "mode": ct.mode,
                "members": len(ct.members),
                "weights": ct.numel,
                "stored_bytes": ct.nbytes,
                "pct_of_bf16": round(100 * ct.nbytes / max(1, 2 * ct.numel), 2),
            }
            if ct.is_coded:
                words = decompress_tensor(ct, device="cpu").reshape(-1).view(torch.int16)
                exp = (words.numpy().view(np.uint16) >> 7) & 0xFF
                p = np.bincount(exp, minlength=256).astype(np.float64) / max(1, exp.size)
                h = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
                row.update(
                    bits_per_weight=round(ct.bits_per_weight, 3),
                    bound_bits_per_weight=round(8 + h, 3),
                    longest_code=int(ct.code.max()) if ct.code_kind == "canonical" else None,
                )
            rows.append(row)
    return rows


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(path, as_json):
    """Show each unit: weights, bits per weight, entropy bound, % of BF16, longest code; totals; and the memory
    plan (compressed + plain + decode buffer, % of BF16) without loading the model. For a diffusers pipeline,
    each compressed component, then the pipeline's plan."""
    from pathlib import Path

    from dfloat.runtime import pipeline

    if pipeline.diffusion_layout(Path(path)) == "pipeline":
        _pipeline(Path(path), as_json)
        return
    _checkpoint(path, as_json)


def _pipeline(folder, as_json: bool) -> None:
    from dfloat.runtime import pipeline
    from dfloat.runtime.pipeline import plan_pipeline

    plan = plan_pipeline(folder)
    compressed = {n: c for n, c in pipeline.components(folder).items() if pipeline.is_compressed_component(c)}
    if as_json:
        out = {n: _checkpoint(c, as_json, echo=False) for n, c in compressed.items()}
        click.echo(json.dumps({"components": out, "memory_plan": plan.as_dict()}, indent=2))
        return
    for name, comp in compressed.items():
        click.echo(f"== {name}")
        _checkpoint(comp, as_json)
        click.echo("")
    for name, nbytes in plan.copied.items():
        click.echo(f"== {name}: stored as it is ({nbytes / 2**20:.2f} MiB of weights)")
    click.echo(plan.summary())


def _checkpoint(path, as_json: bool, echo: bool = True) -> dict:
    rows = unit_rows(path)
    weights = sum(r["weights"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    coded = [r for r in rows if "bound_bits_per_weight" in r]
    bound = sum(r["bound_bits_per_weight"] * r["weights"] for r in coded) / max(
        1, sum(r["weights"] for r in coded)
    )
    total = {
        "units": len(rows),
        "weights": weights,
        "stored_bytes": stored,
        "pct_of_bf16": round(100 * stored / max(1, 2 * weights), 2),
        "bits_per_weight": round(8 * stored / max(1, weights), 3),
        "bound_bits_per_weight": round(bound, 3),
    }
    from dfloat.runtime.memory import plan_checkpoint

    plan = plan_checkpoint(path)
    result = {"units": rows, "total": total, "memory_plan": plan.as_dict()}
    if not echo:
        return result
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return result
    width = max([4, *(len(r["unit"]) for r in rows)])
    cols = [
        ("unit", width),
        ("mode", 7),
        ("weights", 12),
        ("bits/w", 7),
        ("bound", 7),
        ("% BF16", 7),
        ("longest", 7),
    ]
    click.echo("  ".join(f"{c:<{w}}" if c == "unit" else f"{c:>{w}}" for c, w in cols))
    for r in rows:
        vals = [
            r["unit"],
            r["mode"],
            f"{r['weights']:,}",
            r.get("bits_per_weight", "-"),
            r.get("bound_bits_per_weight", "-"),
            r["pct_of_bf16"],
            r.get("longest_code") or "-",
        ]
        click.echo(
            "  ".join(
                f"{str(v):<{w}}" if i == 0 else f"{str(v):>{w}}"
                for i, (v, (_, w)) in enumerate(zip(vals, cols))
            )
        )
    click.echo(
        f"total: {total['units']} units, {weights:,} weights, {stored / 2**20:.2f} MiB stored = "
        f"{total['pct_of_bf16']}% of BF16, {total['bits_per_weight']} bits/weight "
        f"(entropy bound of coded units {total['bound_bits_per_weight']})"
    )
    click.echo(f"memory plan (one device, as load_compressed plans it): {plan.summary()}")
    return result
