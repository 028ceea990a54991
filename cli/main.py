"""`dfloat`: compress, generate, verify, inspect, bench. Errors are one line and a non-zero exit; --debug shows
the traceback."""

from __future__ import annotations

import logging
import sys

import click

from dfloat import __version__
from dfloat.errors import DFloatError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class DFloatGroup(click.Group):
    """Turns every expected failure into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:  # bad option values, unknown commands: one line, exit 1
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"dfloat: error: {e.format_message().strip().splitlines()[0]}", err=True)
            ctx.exit(EXIT_ERROR)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo("dfloat: interrupted; nothing half-written was left behind", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (DFloatError, OSError, ValueError, ImportError) as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            first = str(e).strip().splitlines() or [type(e).__name__]
            rest = str(e).strip().splitlines()[1:]
            click.echo(f"dfloat: error: {first[0]}", err=True)
            for line in rest:
                click.echo(f"  {line.strip()}", err=True)
            ctx.exit(EXIT_ERROR)


@click.group(cls=DFloatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dfloat")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Lossless BF16 model compression: ~30% smaller, bit-identical outputs."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _register() -> None:
    from dfloat.cli import bench, compress, generate, inspect, verify

    for mod in (compress, generate, verify, inspect, bench):
        main.add_command(mod.command)
    from dfloat.cli import decompress

    main.add_command(decompress.command)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
