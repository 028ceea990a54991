"""dfloat verify PATH [--against ORIGINAL]: prove a compressed checkpoint is lossless."""

from __future__ import annotations

import click

from dfloat.cli.options import BACKEND


@click.command("verify")
@click.argument("path")
@click.option(
    "--against", metavar="ORIGINAL", default=None, help="Also compare with the original checkpoint."
)
@click.option(
    "--backend", type=BACKEND, default=None, help="Decoder to check with [default: the fastest here]."
)
def command(path, against, backend):
    """Decode every unit and check it against the stored checksums (exit 1 naming each bad tensor)."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from dfloat.errors import ChecksumError
    from dfloat.runtime import pipeline
    from dfloat.runtime.checkpoint import CompressedCheckpoint
    from dfloat.runtime.compress import verify_checkpoint

    is_pipeline = pipeline.diffusion_layout(Path(path)) == "pipeline"
    ckpt = None if is_pipeline else CompressedCheckpoint.open(path)
    total = None if is_pipeline else len(ckpt.weight_map)  # a pipeline's components are checked one by one
    bar = tqdm(total=total, unit="tensor", desc="verify", leave=False, disable=None)

    def progress(name, done, total, weights):
        bar.set_postfix_str(name[-32:])
        bar.update(1)

    try:
        verify_checkpoint(path, against=against, backend=backend, progress=progress)
    except ChecksumError as e:
        bar.close()
        click.echo(f"FAILED {path}", err=True)
        for line in str(e).splitlines()[1:]:
            click.echo(f"  {line.strip()}", err=True)
        raise SystemExit(1) from None
    finally:
        bar.close()
    if is_pipeline:
        comps = [c for c in pipeline.components(Path(path)).values() if pipeline.is_compressed_component(c)]
        n = sum(len(CompressedCheckpoint.open(c).weight_map) for c in comps)
    else:
        n = len(ckpt.weight_map)
    what = f"checksums and byte-for-byte against {against}" if against else "stored checksums"
    click.echo(f"OK {path}: {n} units and tensors decoded; {what} match")
