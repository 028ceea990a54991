"""dfloat compress SOURCE: a checkpoint to a compressed folder, with progress and a summary."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click


def default_out(source: str) -> Path:
    """./NAME-dfloat, NAME being the folder's name (also for "." or ".."), a single file's name without
    .safetensors, or the Hub id's model name."""
    path = Path(str(source)).expanduser()
    name = (path.resolve() if path.exists() else path).name or "model"
    return Path.cwd() / f"{name.removesuffix('.safetensors')}-dfloat"


@click.command("compress")
@click.argument("source")
@click.option(
    "-o", "--out", "out", type=click.Path(path_type=Path), help="Output folder [default: ./NAME-dfloat]."
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Codec threads [default: all cores]."
)
@click.option("--no-verify", is_flag=True, help="Skip decoding the result against the stored checksums.")
@click.option(
    "--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete)."
)
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", help="Upload the result to this Hub repo.")
@click.option("--revision", default=None, help="Hub revision of SOURCE.")
@click.option(
    "--unit",
    type=click.Choice(["block", "matrix"]),
    default="block",
    show_default=True,
    help="What shares one code: each transformer block, or each matrix (leanest decode buffer).",
)
@click.option(
    "--config-from",
    "config_from",
    metavar="MODEL",
    default=None,
    help="Official DFloat11 diffusion checkpoints: the original model (folder or Hub id) whose config it uses.",
)
def command(source, out, workers, no_verify, overwrite, push_to_hub, revision, unit, config_from):
    """Compress a BF16 model (Hub id or local folder; a diffusers pipeline or model folder too) losslessly, or
    convert an official DFloat11 checkpoint (folder, or a ComfyUI .safetensors file)."""
    from tqdm.auto import tqdm

    import dfloat

    out = out or default_out(source)
    bars: dict[str, tqdm] = {}
    # Ctrl-C is honoured between units (coding or checking them), so it never lands inside a native reader
    # (which would turn it into another error); a second Ctrl-C stops at once. Either way nothing half-written
    # is left behind.
    interrupted: list[bool] = []

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)

    def bar(desc: str):
        # One bar at a time. A pipeline alternates: its components are coded (one count over all of them) and
        # each is checked (a count per component), so a bar reopens where its count is when it comes back.
        def progress(unit, done, total, weights):
            if interrupted:
                raise KeyboardInterrupt
            current = bars.get(desc)
            if current is None or current.disable or current.total != total or done <= current.n:
                for other in bars.values():
                    other.close()
                bars[desc] = tqdm(total=total, initial=done - 1, unit="unit", desc=desc, leave=False)
            bars[desc].set_postfix_str(unit[-32:])
            bars[desc].update(1)

        return progress

    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        report = dfloat.compress_model(
            source,
            out,
            overwrite=overwrite,
            verify=not no_verify,
            workers=workers,
            revision=revision,
            progress=bar("compress"),
            verify_progress=bar("verify"),
            unit=unit,
            config_from=config_from,
        )
    except Exception:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        for b in bars.values():
            b.close()
    seconds = time.perf_counter() - t0
    click.echo(f"compressed {source} -> {out}")
    rows = [
        ("weights", f"{report.weights:,} in {report.units} units ({report.coded_units} coded)"),
        ("before", _size(report.original_bytes)),
        (
            "after",
            f"{_size(report.stored_bytes)} ({100 * report.ratio:.2f}% of BF16, "
            f"{report.bits_per_weight:.2f} bits/weight)",
        ),
        ("time", f"{seconds:.1f} s ({report.weights / max(seconds, 1e-9) / 1e6:.0f} M weights/s)"),
        (
            "verified",
            "no (--no-verify)" if no_verify else "yes: every unit decoded and matched its checksums",
        ),
    ]
    for k, v in rows:
        click.echo(f"  {k:<9} {v}")
    for name, what in getattr(report, "components", {}).items():  # a diffusers pipeline
        click.echo(f"  {name or 'model':<15} {what}")
    if push_to_hub:
        _push(out, push_to_hub)


def _push(folder: Path, repo: str) -> None:
    from dfloat.errors import ModelSourceError

    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo)
    except Exception as e:  # noqa: BLE001 - any Hub failure is one message; the local result stays
        raise ModelSourceError(
            f"could not push to {repo} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            f"the compressed model is complete in {folder}"
        ) from None
    click.echo(f"  pushed    https://huggingface.co/{repo}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
