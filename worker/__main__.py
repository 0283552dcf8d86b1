"""`python -m worker ARGS` is `hotswap worker ARGS`."""

import sys

from control.cli import app

app(args=["worker", *sys.argv[1:]], prog_name="python -m worker")
