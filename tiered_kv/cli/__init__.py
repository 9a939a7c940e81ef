"""The tiered-kv command line: inspect, verify and repair the disk tier; stress, replay, demo.

\b
Exit codes (every command):
  0  success (for ``disk verify``: the tier is clean)
  1  the check failed (corrupt blocks found, data lost or wrong in a stress run)
  2  bad input: a path that is not a tier, an unknown format version, a bad hash, an unreadable file
  3  the tier is locked by a writer (for commands that need the writer lock)
"""

from __future__ import annotations

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.version_option(__version__, prog_name="tiered-kv")
def main() -> None:
    """tiered-kv: inspect and verify the disk tier, stress and replay the store, run the demo."""


def _register() -> None:
    # Each command group lives in its own module; importing it attaches it to ``main``.
    from . import demo, disk, stress  # noqa: F401


_register()
