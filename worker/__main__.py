"""`python -m worker ARGS` is `hotswap worker ARGS`."""

import typer

from worker.cli import worker

typer.run(worker)
