"""The ``cmrtool`` console script: signal handling first, then everything else.

Ctrl-C while torch's C extensions are being imported could abort the process; so SIGINT is
only recorded (:func:`cmrtool.io.interrupts.install_early`) until the CLI, with torch, has been
imported, and then acted on (exit 130, ``error: interrupted``).
"""

from __future__ import annotations


def run() -> None:
    from cmrtool.io import interrupts

    interrupts.install_early()
    from cmrtool.cli.main import run as cli_run

    cli_run()
