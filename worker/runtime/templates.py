"""Objects that are costly to make and cheap to copy, made once per key and copied for each use.

A version's network and its TorchScript trace are both made once per architecture (see
`tracing.py` and `ultralytics_networks.py` for why each); every load gets a deep copy of the
template, whose weights it then replaces with its own. Templates stay for the process's life,
one per key a process has seen, never one per version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Templates(Generic[T]):
    def __init__(self) -> None:
        self._made: dict[str, T] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._made)

    def copy_of(self, described: object, make: Callable[[], T]) -> T:
        """A deep copy of the template `described` names (JSON-able), made by `make` the first time."""
        key = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
        with self._lock:
            template = self._made.get(key)
            if template is None:
                template = self._made[key] = make()
            return copy.deepcopy(template)
