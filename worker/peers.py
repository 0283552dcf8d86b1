"""The worker's side of fleet artifact distribution (`worker.runtime.peers` fetches): serving its
verified artifacts to peers on the status server, and hearing who holds what.

- `GET /artifacts/<sha256>` answers only a request signed with the fleet's worker key for that
  artifact and this worker (403 with the reason otherwise: unsigned, bad signature, invalid,
  mismatch, stale), 404 when the artifact is not held, 503 when `uploads` are running already
  (the asker tries another peer, or this one again later).
- The peer table is fed from the status exchange with heartbeats whose signature the worker key
  verifies, and nothing else: a forged heartbeat cannot point the fleet at a host of its choosing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web

from schemas.control import Heartbeat
from schemas.signing import Refused, Signer, Verifier
from schemas.topology import HEARTBEAT_TYPE, Topology
from worker.config import WorkerSettings
from worker.declarer import Declarer
from worker.runtime.artifacts import ArtifactCache
from worker.runtime.peers import PeerClient, PeerSettings, PeerTable, open_request

log = logging.getLogger(__name__)

#: How old a heartbeat may be and still be believed (the operator allows as much: clocks differ).
HEARTBEAT_MAX_AGE_S = 60.0


class ArtifactServer:
    """The `/artifacts/<sha256>` route of the status server."""

    def __init__(self, worker_id: str, cache: ArtifactCache, verifier: Verifier, uploads: int = 4) -> None:
        self.worker_id = worker_id
        self.cache = cache
        self.verifier = verifier
        self._uploads = asyncio.Semaphore(uploads)
        #: Requests refused, by reason kind: what a forged or misdirected peer tried.
        self.refused: dict[str, int] = {}

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/artifacts/{sha256}", self.artifact)

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        try:
            open_request(request.headers.get("Authorization"), sha256, self.worker_id, self.verifier)
        except Refused as exc:
            self.refused[exc.kind] = self.refused.get(exc.kind, 0) + 1
            log.warning("peer request for %s refused: %s", sha256[:12], exc)
            return web.json_response({"refused": exc.kind, "reason": str(exc)}, status=403)
        path = self.cache.blob(sha256)
        if path is None:
            return web.json_response({"reason": f"artifact {sha256[:12]}… is not held here"}, status=404)
        if self._uploads.locked():
            return web.json_response({"reason": "busy: as many uploads as allowed run already"}, status=503)
        async with self._uploads:
            # Sent whole before the slot is given back: the semaphore bounds the uploads, not the requests.
            response = web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            return response


def advertised_url(status_url: str, configured: str | None) -> str:
    """The URL peers reach this worker's status server at: the configured one, else the status
    server's own, with a wildcard bind address replaced by the host's name."""
    if configured:
        return configured.rstrip("/")
    parts = urlsplit(status_url)
    host = parts.hostname or ""
    with contextlib.suppress(ValueError):
        if ip_address(host).is_unspecified:  # 0.0.0.0 or ::, which nobody can connect to
            return f"{parts.scheme}://{socket.gethostname()}:{parts.port}"
    return status_url.rstrip("/")


class HeartbeatListener:
    """Feeds a `PeerTable` with the fleet's verified heartbeats."""

    def __init__(self, table: PeerTable, verifier: Verifier, topology: Topology) -> None:
        self.table = table
        self.verifier = verifier
        self.topology = topology
        self.rejected = 0
        self._channel: AbstractChannel | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Listen from now on; without the broker's permission to (least privilege, no grant for
        `<ns>.events.*`) the table stays empty and every artifact comes from its source."""
        channel = await connection.channel()
        try:
            queue = await Declarer(channel, self.topology).event_queue()
            await queue.consume(self._on_message, no_ack=True)
        except Exception as exc:
            log.warning("not following the fleet's heartbeats (%s): artifacts come from their sources only", exc)
            with contextlib.suppress(Exception):
                await channel.close()
            return
        self._channel = channel

    async def stop(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.type != HEARTBEAT_TYPE:
            return  # progress events share the exchange
        try:
            event = self.verifier.open_event(message.body, max_age_s=HEARTBEAT_MAX_AGE_S)
        except Refused as exc:
            self.rejected += 1
            log.debug("heartbeat not believed: %s", exc)
            return
        if isinstance(event, Heartbeat):
            self.table.observe(event)


@dataclass
class FleetArtifacts:
    """The parts of peer distribution one worker runs, made together from its settings."""

    table: PeerTable
    client: PeerClient
    server: ArtifactServer
    listener: HeartbeatListener

    @classmethod
    def of(cls, settings: WorkerSettings, signer: Signer, cache: ArtifactCache) -> FleetArtifacts:
        beat = settings.heartbeat_interval_s
        # Three heartbeats missed: gone. Three without anyone holding or fetching it: go to the source.
        table = PeerTable(settings.worker_id, ttl_s=3 * beat + 1.0)
        client = PeerClient(settings.worker_id, table, signer, PeerSettings(
            source_concurrency=settings.peer_source_concurrency, wait_s=settings.peer_wait_s, grace_s=3 * beat,
            poll_s=min(0.2, beat / 2),
        ))
        cache.peers = client
        verifier = signer.verifier()  # the fleet's worker key verifies peers' requests and heartbeats
        server = ArtifactServer(settings.worker_id, cache, verifier, settings.peer_uploads)
        return cls(table, client, server, HeartbeatListener(table, verifier, settings.topology))
