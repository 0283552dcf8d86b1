"""Artifacts from the fleet: who holds what, who goes to the source, and fetching from a peer.

Fifty workers fetching one 300 MB artifact from one store at once is a storm. So workers serve
the artifacts in their verified cache to each other, content-addressed by sha256, and a worker
asks a peer that holds the artifact before it goes to the source:

- **Who holds what** comes from the fleet's signed heartbeats only (`PeerTable.observe`, fed by
  `worker.peers`): each names the worker's peer URL, the sha256s it serves and the ones it is
  fetching from their source.
- **Only the fleet asks**: a request is an `ArtifactRequest` signed with the worker key every
  worker of the fleet holds, naming the artifact and the peer asked, at most a minute old
  (`signed_request` / `open_request`).
- **A peer cannot lie**: what it sends is hashed and compared with the sha256 the signed command
  pins; wrong bytes are thrown away, that peer is skipped for the artifact, and the next one (or
  the source) is tried.
- **The source sees few workers**: the workers that serve the model are ranked, for each artifact,
  by sha256(worker id, sha256); only the first `source_concurrency` go to the source at once. The
  others wait for a peer to hold it. A worker never waits for good: when nobody holds or fetches
  the artifact for `grace_s` (a little more for each lower rank, so that stragglers do not all go
  at once), or after `wait_s` in all, it goes to the source itself.

Blocking, for the control thread, like the rest of `worker.runtime.artifacts`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import random
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Literal
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

from pydantic import ValidationError

from schemas.control import ArtifactRequest, Heartbeat
from schemas.signing import Refused, Signer, Verifier
from worker.runtime.repository import RepositoryError, copy_at_most, sha256_of

log = logging.getLogger(__name__)

#: The HTTP header a peer request travels in: `Authorization: Hotswap <base64url of the signed envelope>`.
AUTH_SCHEME = "Hotswap"
#: What one try at a peer comes to: the artifact, never this peer again for it, or maybe later.
Outcome = Literal["ok", "skip", "later"]
#: A request older (or further ahead) than this is refused: a captured one is soon worth nothing.
MAX_REQUEST_AGE_S = 60.0


def rank_key(worker_id: str, sha256: str) -> str:
    """Each artifact orders the fleet afresh: the same few workers do not go to every source first."""
    return hashlib.sha256(f"{worker_id}\n{sha256}".encode()).hexdigest()


@dataclass(frozen=True)
class Peer:
    worker_id: str
    url: str
    models: frozenset[str]
    holds: frozenset[str]
    fetching: frozenset[str]
    seen: float  # time.monotonic() when its heartbeat arrived


class PeerTable:
    """The fleet as its verified heartbeats describe it. Written on the event loop, read by the
    control thread: a lock around one dict."""

    def __init__(self, worker_id: str, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.worker_id = worker_id
        self.ttl_s = ttl_s
        self._clock = clock
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()

    def observe(self, beat: Heartbeat) -> None:
        """Record a heartbeat whose signature has been checked (never an unverified one)."""
        if beat.worker_id == self.worker_id:
            return
        if beat.peer_url is None or urlsplit(beat.peer_url).scheme not in ("http", "https"):
            peer_url = ""  # a member of the fleet (it counts in the ranking) that serves nothing
        else:
            peer_url = beat.peer_url.rstrip("/")
        peer = Peer(beat.worker_id, peer_url, frozenset(beat.models), frozenset(beat.artifacts),
                    frozenset(beat.fetching), self._clock())
        with self._lock:
            self._peers[beat.worker_id] = peer

    def live(self) -> list[Peer]:
        """Peers heard from within `ttl_s`: a worker that stopped drops out of the ranking by itself."""
        now = self._clock()
        with self._lock:
            return [p for p in self._peers.values() if now - p.seen <= self.ttl_s]

    def holders(self, sha256: str, skip: frozenset[str] = frozenset()) -> list[Peer]:
        """Live peers that serve `sha256`, in an order of this worker's own, so that the fleet spreads
        its requests over every holder rather than all asking the first."""
        found = [p for p in self.live() if sha256 in p.holds and p.url and p.worker_id not in skip]
        return sorted(found, key=lambda p: rank_key(f"{self.worker_id}\n{p.worker_id}", sha256))

    def someone_fetches(self, sha256: str, skip: frozenset[str] = frozenset()) -> bool:
        return any(sha256 in p.fetching for p in self.live() if p.worker_id not in skip)

    def rank(self, model: str, sha256: str) -> int:
        """This worker's place among the live workers serving `model` (itself included), for `sha256`."""
        members = {p.worker_id for p in self.live() if model in p.models} | {self.worker_id}
        return sorted(members, key=lambda w: rank_key(w, sha256)).index(self.worker_id)


def signed_request(signer: Signer, worker_id: str, to: str, sha256: str) -> str:
    """The `Authorization` header value of a request for `sha256` to the peer `to`."""
    request = ArtifactRequest(worker_id=worker_id, to=to, sha256=sha256, at=datetime.now(UTC))
    envelope = signer.sign_text(request.model_dump_json()).model_dump_json()
    return f"{AUTH_SCHEME} {base64.urlsafe_b64encode(envelope.encode()).decode()}"


def open_request(header: str | None, sha256: str, me: str, verifier: Verifier,
                 now: datetime | None = None) -> ArtifactRequest:
    """The request in an `Authorization` header, or `Refused` saying why it is not believed."""
    scheme, _, token = (header or "").partition(" ")
    if scheme != AUTH_SCHEME or not token:
        raise Refused(f"unsigned: peer requests carry 'Authorization: {AUTH_SCHEME} <signed envelope>'", "unsigned")
    try:
        raw = base64.urlsafe_b64decode(token.encode())
    except (binascii.Error, ValueError):
        raise Refused("unsigned: the Authorization token is not base64url", "unsigned") from None
    body = verifier.open_text(raw, "peer request")  # raises Refused: unsigned or bad signature
    try:
        request = ArtifactRequest.model_validate_json(body)
    except ValidationError as exc:
        raise Refused(f"signed, but not a valid peer request: {exc.errors()[0]['msg']}", "invalid") from exc
    if request.sha256 != sha256 or request.to != me:
        raise Refused(f"signed for {request.sha256[:12]}… at {request.to}, not {sha256[:12]}… at {me}", "mismatch")
    age = ((now or datetime.now(UTC)) - request.at).total_seconds()
    if abs(age) > MAX_REQUEST_AGE_S:
        raise Refused(f"stale: the request is {age:.0f} s old (more than {MAX_REQUEST_AGE_S:g} s either way)", "stale")
    return request


@dataclass(frozen=True)
class PeerSettings:
    source_concurrency: int = 2  # workers of a fleet fetching one artifact from its source at once
    wait_s: float = 120.0  # longest a worker waits for peers before it goes to the source anyway
    grace_s: float = 3.0  # nobody holding or fetching it this long (more per rank): go to the source
    poll_s: float = 0.2
    timeout_s: float = 30.0  # one connect or read from a peer
    max_bytes: int = 4 * 1024**3


@dataclass
class PeerClient:
    """Fetches artifacts from peers for `ArtifactCache`; `enabled` False sends every fetch to the source."""

    worker_id: str
    table: PeerTable
    signer: Signer
    settings: PeerSettings = field(default_factory=PeerSettings)
    enabled: bool = True
    #: (peer, sha256, why) of each peer fetch that failed, newest last (a few kept): for /status and tests.
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # No proxies from the environment (peers are inside the fleet's network), no redirects (a
        # peer answers itself or not at all).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())

    def close(self) -> None:
        """Stop waiting (the worker is stopping): a fetch waiting for peers fails at once."""
        self._stop.set()

    def fetch(self, model: str, sha256: str, target: Path) -> bool:
        """Blocking: True once `target` holds verified bytes of `sha256` from a peer; False when this
        worker is to go to the source itself (its rank, nobody fetching it, or waited long enough)."""
        started = time.monotonic()
        last_sign_of_life = started
        bad: set[str] = set()  # peers that sent wrong bytes or refused: not asked again for this one
        while not self._stop.is_set():
            for peer in self.table.holders(sha256, frozenset(bad)):
                outcome = self._from_peer(peer, sha256, target)
                if outcome == "ok":
                    log.info("artifact %s… from peer %s", sha256[:12], peer.worker_id)
                    return True
                if outcome == "skip":
                    bad.add(peer.worker_id)
            now = time.monotonic()
            rank = self.table.rank(model, sha256)
            if rank < self.settings.source_concurrency or now - started >= self.settings.wait_s:
                return False
            if self.table.holders(sha256, frozenset(bad)) or self.table.someone_fetches(sha256, frozenset(bad)):
                last_sign_of_life = now
            elif now - last_sign_of_life >= self._patience(rank):
                log.info("artifact %s…: no peer holds or fetches it; to the source", sha256[:12])
                return False
            # Jittered, so that the waiters of a fleet do not poll in step.
            self._stop.wait(self.settings.poll_s * random.uniform(0.5, 1.5))
        raise RepositoryError("the worker is stopping: the artifact was not fetched")

    def _patience(self, rank: int) -> float:
        # Ranks past the first few step up by one grace per `source_concurrency`: when the worker that
        # fetched dies, the next few go to the source, and the rest see them fetching and wait again.
        return self.settings.grace_s * (1 + rank // self.settings.source_concurrency)

    def _from_peer(self, peer: Peer, sha256: str, target: Path) -> Outcome:
        request = urllib.request.Request(
            f"{peer.url}/artifacts/{sha256}",
            headers={"Authorization": signed_request(self.signer, self.worker_id, peer.worker_id, sha256)},
        )
        try:
            with self._opener.open(request, timeout=self.settings.timeout_s) as response, target.open("wb") as out:
                copy_at_most(response, out, self.settings.max_bytes, f"peer {peer.worker_id}'s copy")
            actual = sha256_of(target)
        except HTTPError as exc:
            # Busy (503) is worth asking again; anything else this peer answers (403, 404) is final.
            return self._failed(peer, sha256, target, _said(exc), "later" if exc.code == 503 else "skip")
        except (OSError, URLError, ValueError, RepositoryError) as exc:
            # Unreachable (a URL the others cannot connect to), cut off, or too big: not asked again for
            # this artifact, nor taken for a sign that it is coming, else a waiter would wait for nothing.
            return self._failed(peer, sha256, target, str(exc), "skip")
        if actual != sha256:
            why = f"sent bytes with sha256 {actual[:12]}…, not {sha256[:12]}…"
            return self._failed(peer, sha256, target, why, "skip")
        return "ok"

    def _failed(self, peer: Peer, sha256: str, target: Path, why: str, outcome: Outcome) -> Outcome:
        log.warning("peer %s could not give artifact %s…: %s", peer.worker_id, sha256[:12], why)
        self.failures = [*self.failures[-19:], (peer.worker_id, sha256, why)]
        target.unlink(missing_ok=True)
        return outcome


def _said(exc: HTTPError) -> str:
    return f"HTTP {exc.code}: {exc.read(500).decode(errors='replace')}"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> urllib.request.Request | None:
        return None  # urllib then raises the 3xx as an HTTPError: the peer is skipped
