"""Print a RabbitMQ `password_hash` for definitions.json (rabbit_password_hashing_sha256).

    python ops/rabbitmq/hash_password.py 's3cret'      # or the password on stdin

The broker stores base64(salt + sha256(salt + password)) with a 4-byte random salt; this is the
same, so a hash made here logs in exactly as one `rabbitmqctl change_password` made.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys


def password_hash(password: str, salt: bytes | None = None) -> str:
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def matches(password: str, stored: str) -> bool:
    """Whether `stored` (a definitions file's password_hash) is the hash of `password`."""
    salt = base64.b64decode(stored)[:4]
    return password_hash(password, salt) == stored


if __name__ == "__main__":
    print(password_hash(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.readline().rstrip("\n")))
