"""Ed25519 signatures on control commands: the operator signs, workers only verify."""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from schemas.control import Command, SignedEnvelope


class Refused(Exception):
    """A command that must not be applied; the message says why (reported to the operator)."""


def generate_keys(directory: Path) -> tuple[Path, Path]:
    """Write `control.key` (private, mode 600) and `control.pub` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    private_path, public_path = directory / "control.key", directory / "control.pub"
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


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
        body = command.model_dump_json()
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
        try:
            envelope = SignedEnvelope.model_validate_json(raw)
        except ValidationError as exc:
            raise Refused(f"not a signed command envelope: {exc.errors()[0]['msg']}") from exc
        try:
            signature = base64.b64decode(envelope.signature, validate=True)
            self._public.verify(signature, envelope.body.encode())
        except (InvalidSignature, binascii.Error, ValueError) as exc:
            raise Refused(f"bad signature (key {envelope.key_id}; this worker trusts {self.key_id})") from exc
        try:
            return Command.model_validate_json(envelope.body)
        except ValidationError as exc:
            raise Refused(f"signed, but not a valid command: {exc.errors()[0]['msg']}") from exc


def peek(raw: bytes) -> Command | None:
    """The command in an envelope WITHOUT checking its signature: only to say what was refused."""
    try:
        return Command.model_validate_json(SignedEnvelope.model_validate_json(raw).body)
    except ValidationError:
        return None
