"""`hotswap console`: the web console (plugged in through the entry point `hotswap.commands`).

Only typer here: `hotswap --help` must not pay for aiohttp's server, OpenCV or the model runtime.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="The web console: the fleet, updates as they happen, a model tried on an image, and "
                       "what runs changed, from a browser.")


@app.callback(invoke_without_command=True)
def console(
    host: Annotated[str | None, typer.Option(help="address to listen on (HOTSWAP_CONSOLE_HOST, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (HOTSWAP_CONSOLE_PORT, 8090)")] = None,
) -> None:
    """Serve the console. Sign-in: HOTSWAP_CONSOLE_TOKEN or HOTSWAP_CONSOLE_PASSWORD_FILE; it signs
    commands with the operator key (HOTSWAP_CONTROL_KEY) and believes only the workers' signed
    status events (HOTSWAP_WORKER_PUBLIC_KEY), as the CLI does."""
    from pydantic import ValidationError

    from console.server import MissingKey, run
    from console.settings import ConsoleSettings, NoSecret

    try:
        settings = ConsoleSettings()
        if host is not None or port is not None:
            settings = settings.model_copy(update={k: v for k, v in (("console_host", host), ("console_port", port))
                                                   if v is not None})
        run(settings)
    except (NoSecret, MissingKey, ValidationError, OSError) as exc:
        typer.echo(f"hotswap console: {exc}", err=True)
        raise typer.Exit(2) from exc
