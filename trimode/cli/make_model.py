"""`trimode make-model`: write a random-weight NLD model of a named geometry."""
from __future__ import annotations

import sys
import time

import click

from trimode.model.config import GEOMETRIES


@click.command("make-model")
@click.option("--geometry", type=click.Choice(list(GEOMETRIES)), default="tiny", show_default=True,
              help="Model size: tiny (tests) or a published NLD geometry (benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
def make_model(geometry: str, seed: int, out: str):
    """Write a random-weight NLD GGUF file OUT with real keys, tensor names and a BPE vocab."""
    from trimode.model.make_model import make_model as write

    started = time.monotonic()
    progress = _Progress(overwrite=sys.stderr.isatty())
    try:
        config = write(out, geometry, seed=seed, progress=progress)
    except OSError as err:
        raise click.ClickException(f"cannot write {out}: {err.strerror}") from None
    finally:
        progress.finish()
    click.echo(f"wrote {out}: {geometry} geometry ({config.geometry_key()}), seed {seed}, "
               f"{time.monotonic() - started:.1f} s", err=True)


class _Progress:
    """Bytes written so far on stderr (full geometries take about a minute): one
    self-overwriting line on a terminal, else a line per tenth."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.shown_tenths = 0
        self.started = False

    def __call__(self, done: int, total: int) -> None:
        line = f"{done / 1e9:6.2f} / {total / 1e9:.2f} GB"
        if self.overwrite:
            click.echo(f"\r{line}", err=True, nl=False)
            self.started = True
        elif done * 10 // total > self.shown_tenths:
            self.shown_tenths = done * 10 // total
            click.echo(line, err=True)

    def finish(self) -> None:
        if self.started:
            click.echo("", err=True)
