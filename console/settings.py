"""The console's settings: environment (`HOTSWAP_*`), the broker and keys named as the CLI names
them (HOTSWAP_AMQP_URL, HOTSWAP_CONTROL_KEY, HOTSWAP_WORKER_PUBLIC_KEY), its own as HOTSWAP_CONSOLE_*."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from control.client import DEFAULT_AMQP_URL
from control.commands import DEFAULT_KEY, DEFAULT_WORKER_KEY


class NoSecret(ValueError):
    """Nobody could sign in, and anonymous viewing is off: the console would show nothing to anyone."""


class ConsoleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSWAP_", extra="ignore")

    amqp_url: str = Field(DEFAULT_AMQP_URL, description="broker URL(s), comma separated")
    namespace: str = Field("hotswap", pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    control_key: Path = Field(DEFAULT_KEY, description="the operator's private key: the console signs with it")
    worker_public_key: Path = Field(DEFAULT_WORKER_KEY, description="verifies the workers' status events")

    console_host: str = "127.0.0.1"
    console_port: int = Field(8090, ge=0, le=65535, description="0 picks a free port")
    console_token: SecretStr | None = Field(None, description="signs in (HOTSWAP_CONSOLE_TOKEN)")
    console_password_file: Path | None = Field(None, description="a file holding a password that signs in too")
    console_session_ttl_s: float = Field(8 * 3600.0, gt=0, description="a session ends this long after sign-in")
    console_anonymous_view: bool = Field(
        False, description="fleet and updates visible without signing in (changes and Try it still need it)")
    console_secure_cookie: bool = Field(False, description="the session cookie only over HTTPS (behind TLS)")
    console_stale_after_s: float = Field(10.0, gt=0, description="a worker unheard this long leaves the fleet")
    console_job_timeout_s: float = Field(30.0, gt=0, description="Try it: seconds to wait for a result")
    console_max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Try it: largest image taken")
    console_max_image_pixels: int = Field(40_000_000, ge=1, description="Try it: largest image, in pixels")
    console_timeline: int = Field(50, ge=1, le=10_000, description="commands the Updates page keeps")

    def secrets(self) -> list[bytes]:
        """What signs in: the token, the password file's first line; none when neither is set."""
        found = []
        if self.console_token is not None and self.console_token.get_secret_value():
            found.append(self.console_token.get_secret_value().encode())
        if self.console_password_file is not None:
            lines = self.console_password_file.read_text().splitlines()
            if lines and lines[0]:
                found.append(lines[0].encode())
        if not found and not self.console_anonymous_view:
            raise NoSecret("set HOTSWAP_CONSOLE_TOKEN or HOTSWAP_CONSOLE_PASSWORD_FILE to sign in with "
                           "(or HOTSWAP_CONSOLE_ANONYMOUS_VIEW=true for a read-only console)")
        return found
