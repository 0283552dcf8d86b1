"""`hotswap console`: plugged in by entry point, cheap to import, refusing to start where nobody could sign in."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from console.cli import app

REPO = Path(__file__).resolve().parents[2]


def test_the_command_is_an_entry_point_and_its_pages_are_package_data() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["hotswap.commands"]["console"] == "console.cli:app"
    assert "console*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = project["tool"]["setuptools"]["package-data"]["console"]
    for page in (REPO / "console" / "static").iterdir():
        assert any(page.match(f"console/{pattern}") for pattern in shipped), page.name


def test_loading_the_command_imports_no_server_and_no_model_framework() -> None:
    probe = ("import sys, console.cli; print(sorted(m for m in ('torch', 'cv2', 'aiohttp.web', 'console.server') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_without_a_token_or_password_it_says_what_to_set(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--port", "0"], env={"HOTSWAP_CONSOLE_TOKEN": "",
                                                           "HOTSWAP_CONSOLE_ANONYMOUS_VIEW": "false"})
    assert result.exit_code == 2 and "set HOTSWAP_CONSOLE_TOKEN or HOTSWAP_CONSOLE_PASSWORD_FILE" in result.output
    no_key = CliRunner().invoke(app, [], env={"HOTSWAP_CONSOLE_TOKEN": "t", "HOTSWAP_WORKER_PUBLIC_KEY":
                                              str(tmp_path / "worker.pub")})
    assert no_key.exit_code == 2 and f"no worker public key at {tmp_path / 'worker.pub'}" in no_key.output
