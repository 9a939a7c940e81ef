"""``python -m tiered_kv.stress stress ...`` / ``python -m tiered_kv.stress replay ...``: the same commands as
``tiered-kv stress`` and ``tiered-kv replay``, without going through the console script."""

from __future__ import annotations

import click

from ..cli.stress import replay, stress

cli = click.Group("tiered_kv.stress", commands={"stress": stress, "replay": replay},
                  help="The stress and replay commands of tiered-kv.")

if __name__ == "__main__":
    cli()
