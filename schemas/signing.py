"""Ed25519 signatures on the control plane, in both directions.

Commands: the operator signs with `control.key`; workers hold only `control.pub`.
Status events (progress, heartbeats): workers sign with `worker.key`; the operator's CLI holds
only `worker.pub` and believes nothing else, so whoever else can publish to the status exchange
cannot make `--wait` report a success that no worker reported.

Both travel as a `SignedEnvelope` whose `body` is the JSON text signed as those exact bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import TypeAdapter, ValidationError

from schemas.control import Command, Heartbeat, Progress, SignedEnvelope, StatusEvent

_EVENTS: TypeAdapter[Progress | Heartbeat] = TypeAdapter(StatusEvent)


class Refused(Exception):
    """A command or event that must not be believed; the message says why, `kind` in a word or two
    (for counting): unsigned, bad signature, invalid, stale, or what the refuser names."""

    def __init__(self, message: str, kind: str = "refused") -> None:
        super().__init__(message)
        self.kind = kind


class KeyFiles(NamedTuple):
    control_key: Path  # the operator's: signs commands
    control_public: Path  # the workers': verifies commands (HOTSWAP_CONTROL_PUBLIC_KEY)
    worker_key: Path  # the workers': signs status events (HOTSWAP_WORKER_KEY)
    worker_public: Path  # the operator's: verifies status events (HOTSWAP_WORKER_PUBLIC_KEY)


def generate_keys(directory: Path) -> KeyFiles:
    """Write both key pairs into `directory`: control.key/.pub and worker.key/.pub (private ones mode 600)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = KeyFiles(*(directory / name for name in ("control.key", "control.pub", "worker.key", "worker.pub")))
    for private_path in (files.control_key, files.worker_key):
        if private_path.exists():
            raise FileExistsError(f"{private_path} exists; refusing to overwrite a signing key")
    _write_pair(files.control_key, files.control_public)
    _write_pair(files.worker_key, files.worker_public)
    return files


def _write_pair(private_path: Path, public_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def verifier(self) -> Verifier:
        return Verifier(self._private.public_key())

    def sign(self, command: Command) -> SignedEnvelope:
        return self.sign_text(command.model_dump_json())

    def sign_event(self, event: Progress | Heartbeat) -> bytes:
        """The wire bytes of a signed status event."""
        return self.sign_text(event.model_dump_json()).model_dump_json().encode()

    def sign_text(self, body: str) -> SignedEnvelope:
        signature = self._private.sign(body.encode())
        return SignedEnvelope(key_id=self.key_id, body=body, signature=base64.b64encode(signature).decode())


class Verifier:
    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        self.key_id = key_id(public)

    @classmethod
    def from_file(cls, path: Path) -> Verifier:
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path} is not an Ed25519 public key")
        return cls(key)

    def open(self, raw: bytes) -> Command:
        """The command inside a signed envelope, or `Refused` saying what is wrong with it."""
        body = self.open_text(raw, "command")
        try:
            return Command.model_validate_json(body)
        except ValidationError as exc:
            raise Refused(f"signed, but not a valid command: {exc.errors()[0]['msg']}", "invalid") from exc

    def open_event(self, raw: bytes, *, max_age_s: float, now: datetime | None = None) -> Progress | Heartbeat:
        """A status event a worker signed, not older (nor further ahead) than `max_age_s`: an old
        envelope replayed would otherwise make a dead worker look alive."""
        body = self.open_text(raw, "status event")
        try:
            event = _EVENTS.validate_json(body)
        except ValidationError as exc:
            raise Refused(f"signed, but not a valid status event: {exc.errors()[0]['msg']}", "invalid") from exc
        at = event.at if event.at.tzinfo else event.at.replace(tzinfo=UTC)
        age = ((now or datetime.now(UTC)) - at).total_seconds()
        if abs(age) > max_age_s:
            raise Refused(f"stale: the event is {age:.0f} s old (more than {max_age_s:g} s either way)", "stale")
        return event

    def open_text(self, raw: bytes, what: str) -> str:
        """The body of a signed envelope once its signature checks out."""
        try:
            envelope = SignedEnvelope.model_validate_json(raw)
        except ValidationError as exc:
            raise Refused(f"not a signed {what} envelope: {exc.errors()[0]['msg']}", "unsigned") from exc
        try:
            signature = base64.b64decode(envelope.signature, validate=True)
            self._public.verify(signature, envelope.body.encode())
        except (InvalidSignature, binascii.Error, ValueError) as exc:
            raise Refused(f"bad signature (key {envelope.key_id}; this side trusts {self.key_id})",
                          "bad signature") from exc
        return envelope.body


def peek(raw: bytes) -> Command | None:
    """The command in an envelope WITHOUT checking its signature: only to say what was refused."""
    try:
        return Command.model_validate_json(SignedEnvelope.model_validate_json(raw).body)
    except ValidationError:
        return None
