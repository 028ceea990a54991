"""Entry point of the installed ``dfloat`` command.

It lives outside the ``dfloat`` package because importing anything inside it imports torch first (seconds):
Ctrl-C during those imports then ends the command with one line and exit code 130, as Ctrl-C at any later point
does (dfloat.cli.main), instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def main() -> int | None:
    try:
        from dfloat.cli.main import main as dfloat_main
    except KeyboardInterrupt:
        sys.stderr.write("dfloat: interrupted\n")
        return EXIT_INTERRUPTED
    return dfloat_main()
