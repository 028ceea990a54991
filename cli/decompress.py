"""dfloat decompress FOLDER -o OUT: the original BF16 checkpoint back, optionally with LoRA adapters merged."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("decompress")
@click.argument("folder")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--adapter", type=click.Path(path_type=Path), help="PEFT adapter folder to merge into the weights."
)
@click.option(
    "--compress", is_flag=True, help="With --adapter: write the merged model compressed (dfloat) again."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete)."
)
def command(folder, out, adapter, compress, overwrite):
    """Write the BF16 model of a compressed FOLDER (tensors byte-identical to the original)."""
    if compress and adapter is None:
        raise click.UsageError(
            "--compress only applies with --adapter (without it the input already is compressed)"
        )
    if adapter is not None:
        from dfloat.runtime.peft_export import merge_adapters

        merge_adapters(folder, adapter, out, compress=compress, overwrite=overwrite)
        click.echo(f"merged {adapter} into {folder} -> {out}{' (compressed)' if compress else ' (BF16)'}")
        return
    import dfloat

    dfloat.decompress_model(folder, out, overwrite=overwrite)
    click.echo(f"decompressed {folder} -> {out} (BF16, every tensor checked against its checksum)")
