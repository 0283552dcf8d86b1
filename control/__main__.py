"""`python -m control ARGS` is `hotswap ARGS`."""

from control.cli import main

main()
