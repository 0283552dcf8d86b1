"""The worker's side of the control plane: read the signed control log, apply it, report.

Every worker reads the stream `<ns>.control.log` from its first entry. Until it reaches a sync
marker it published itself, it only folds commands into each model's log; then it reduces the
log to the desired state and loads just that (a late or restarted worker never loads versions
that later commands replaced). After that, commands apply live, strictly one at a time in
stream order: a command arriving while another is being applied waits, and when several wait,
the reduction of all of them is applied at once (intermediate versions are never loaded).

Outcomes, per worker and command: `done`, `failed` (with the reason; serving is untouched),
`refused` (bad signature, stale or duplicate sequence number, duplicate command id).

Progress events and heartbeats are signed with the worker key (`schemas.signing`): the operator
believes no status event it cannot verify.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from schemas.control import (
    Command,
    Heartbeat,
    ModelStatus,
    OnDemand,
    Phase,
    Progress,
    Rollback,
    Update,
    VersionStatus,
)
from schemas.rollout import RolloutMark
from schemas.signing import Refused, Signer, Verifier, peek
from schemas.status import CleanupRecord, ControlStatus
from schemas.topology import HEARTBEAT_TYPE, PROGRESS_TYPE, SYNC_TYPE, Topology
from worker.declarer import FROM_THE_START, Declarer
from worker.evidence import Evidence
from worker.logs import log_context
from worker.metrics import WorkerMetrics
from worker.peers import HeartbeatListener
from worker.runtime.desired import DesiredState, reduce
from worker.runtime.manager import LoadFailed, ModelManager, ProgressCallback, no_progress

log = logging.getLogger(__name__)


class ControlLoop:
    def __init__(
        self,
        *,
        worker_id: str,
        topology: Topology,
        manager: ModelManager,
        verifier: Verifier,
        signer: Signer,
        metrics: WorkerMetrics,
        initial: dict[str, str],
        keep_standby: int = 1,
        heartbeat_interval_s: float = 2.0,
        peer_url: str | None = None,
        peers: HeartbeatListener | None = None,
        evidence: Evidence | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.topology = topology
        self.manager = manager
        self.verifier = verifier
        self.signer = signer
        self.metrics = metrics
        #: The version each served model starts on before any command: from --model.
        self.initial = initial
        self.keep_standby = keep_standby
        self.heartbeat_interval_s = heartbeat_interval_s
        #: Where this worker serves its artifacts to the fleet (announced in heartbeats); None: it does not.
        self.peer_url = peer_url
        self.peers = peers
        #: What each version answered here, reported in heartbeats for rollouts to judge by.
        self.evidence = evidence
        self.logs: dict[str, list[Command]] = {model: [] for model in initial}
        self.applied_seq: dict[str, int] = dict.fromkeys(initial, 0)
        self.last_error: str | None = None
        self._seen_ids: set[str] = set()
        self._last_offset = -1
        self._marker = uuid.uuid4().hex
        self._caught_up = asyncio.Event()
        self._queue: asyncio.Queue[Command] = asyncio.Queue()
        self._status: AbstractExchange | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def desired(self, model: str) -> DesiredState:
        unusable = self.manager.unusable(model).keys()
        return reduce(model, self.logs[model], unusable, self.keep_standby, self.initial[model])

    async def start(self, connection: AbstractRobustConnection, catch_up_timeout_s: float = 60.0) -> None:
        """Replay the log, bring every model to its desired state, then follow live."""
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=256)  # a stream consumer needs credit
        # Consume on the queue object the robust channel declared: only that one (and its
        # consumer) is restored after a reconnect.
        _, queue = await Declarer(channel, self.topology).control()
        status_channel = await connection.channel(publisher_confirms=False)
        self._status = await Declarer(status_channel, self.topology).status_exchange()
        await queue.consume(self._on_message, arguments=FROM_THE_START)
        if self.peers is not None:  # before the log is applied: its updates may ask peers already
            await self.peers.start(connection)
        # Straight into the stream through the default exchange, which the worker writes its results
        # to anyway: under least privilege a worker may not publish on the control exchange.
        marker = aio_pika.Message(b"", type=SYNC_TYPE, message_id=self._marker)
        await channel.default_exchange.publish(marker, routing_key=self.topology.control_log)
        await asyncio.wait_for(self._caught_up.wait(), catch_up_timeout_s)
        for model in self.initial:
            await self._converge(model, no_progress)
            self.applied_seq[model] = self.desired(model).seq
        self._tasks = [asyncio.create_task(self._apply_live()), asyncio.create_task(self._heartbeats()),
                       asyncio.create_task(self.manager.on_demand.sweep_forever())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.peers is not None:
            await self.peers.stop()

    # --- reading the log ---------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        raw_offset = (message.headers or {}).get("x-stream-offset")
        offset = raw_offset if isinstance(raw_offset, int) else -1
        log.debug("control log entry at offset %s (type %s)", offset, message.type)
        if 0 <= offset <= self._last_offset:
            return  # read again after a reconnect: already handled
        self._last_offset = max(offset, self._last_offset)
        if message.type == SYNC_TYPE:
            if message.message_id == self._marker:
                self._caught_up.set()
            return
        try:
            command = self.verifier.open(message.body)
            self._admit(command)
        except Refused as exc:
            await self._refuse(message, str(exc))
            return
        if command.model in self.logs:
            self.logs[command.model].append(command)
            if self._caught_up.is_set():
                self._queue.put_nowait(command)

    def _admit(self, command: Command) -> None:
        if command.command_id in self._seen_ids:
            raise Refused(f"duplicate command {command.command_id}: already received")
        self._seen_ids.add(command.command_id)
        if command.model not in self.logs:
            return
        newest = max((c.seq for c in self.logs[command.model]), default=0)
        if command.seq <= newest:
            raise Refused(f"stale: sequence {command.seq} is not after {newest}, the newest for {command.model}")

    async def _refuse(self, message: AbstractIncomingMessage, reason: str) -> None:
        if not self._caught_up.is_set():
            return  # refused when it was live; replaying it changes nothing and reports nothing
        claimed = peek(message.body)  # unverified: only to say what was refused
        if claimed is not None and claimed.model not in self.logs:
            return  # another worker's model
        model = claimed.model if claimed else "?"
        command_id = claimed.command_id if claimed else message.message_id or "?"
        seq, action = (claimed.seq, claimed.action.kind) if claimed else (0, "?")
        self.last_error = f"refused {command_id}: {reason}"
        self.metrics.control_commands.labels(model, action, "refused").inc()
        await self._progress(model, command_id, seq, "refused", reason)

    # --- applying ----------------------------------------------------------------------------

    async def _apply_live(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for model in dict.fromkeys(c.model for c in batch):
                try:
                    await self._apply([c for c in batch if c.model == model])
                except Exception:  # a bug here must not stop the control plane for good
                    log.exception("applying control commands for %s failed", model)

    async def _apply(self, commands: list[Command]) -> None:
        """Apply the newest of `commands` (one model); the older ones it supersedes are done too."""
        newest = commands[-1]
        # Every line logged while it applies (the runtime's too) names the command and its version.
        with log_context(command_id=newest.command_id, model=newest.model, seq=newest.seq,
                         version=_target_version(newest)):
            await self._apply_newest(commands, newest)

    async def _apply_newest(self, commands: list[Command], newest: Command) -> None:
        for command in commands:
            await self._progress(command.model, command.command_id, command.seq, "received",
                                 version=_target_version(command))
            if isinstance(command.action, Update):  # asked again: worth another try (it may have been transient)
                self.manager.retry(command.model, command.action.version)
            if isinstance(command.action, OnDemand):  # the same for versions allowed on demand again
                for version in command.action.versions:
                    self.manager.retry(command.model, version)

        async def progress(model: str, version: str, phase: Phase) -> None:
            await self._progress(model, newest.command_id, newest.seq, phase, version=version)

        started = time.perf_counter()
        failure = await self._converge(newest.model, progress)
        outcome: Phase = "failed" if failure else "done"
        for command in commands:
            self.applied_seq[command.model] = command.seq
            label = outcome if command is newest else "superseded"
            self.metrics.control_commands.labels(command.model, command.action.kind, label).inc()
            reason = failure or _rollout_reason(command)
            await self._progress(command.model, command.command_id, command.seq, outcome, reason,
                                 time.perf_counter() - started, version=_target_version(command))
        if newest.rollout is not None and not failure:
            self._count_rollout(newest.model, newest.rollout)

    def _count_rollout(self, model: str, mark: RolloutMark) -> None:
        candidate = mark.plan.candidate
        if mark.phase == "aborted":
            self.metrics.rollout_aborts.labels(model, candidate, mark.gate or "operator").inc()
        percent = {"canary": mark.plan.steps[min(mark.step, len(mark.plan.steps) - 1)], "promoted": 100.0}
        self.metrics.rollout_step.labels(model, candidate).set(percent.get(mark.phase, 0.0))

    async def _converge(self, model: str, progress: ProgressCallback) -> str | None:
        """Reconcile to the desired state; when a version fails, it becomes unusable and the
        state without it is reconciled instead. Returns the first failure's reason; raises
        LoadFailed when there is nothing left to fall back to (a worker that cannot start)."""
        failure: str | None = None
        while True:
            desired = self.desired(model)
            try:
                # Falling back after a failure restores what served: nothing to report for it.
                await self.manager.reconcile(desired, no_progress if failure else progress)
                self.metrics.swaps.labels(model).inc()
                return failure
            except LoadFailed as exc:
                failure = failure or str(exc)
                self.last_error = failure
                if self.desired(model) == desired:
                    raise

    # --- reporting ---------------------------------------------------------------------------

    async def _progress(
        self, model: str, command_id: str, seq: int, phase: Phase,
        reason: str | None = None, seconds: float | None = None, *, version: str | None = None,
    ) -> None:
        # The phase is logged as it is reported: a fleet's log collector follows one update by its
        # command id, phase by phase, on every worker.
        fields = {"command_id": command_id, "model": model, "seq": seq, "phase": phase, "version": version,
                  "seconds": round(seconds, 3) if seconds is not None else None}
        log.log(logging.WARNING if phase in ("failed", "refused") else logging.INFO, "command %s (%s #%d): %s%s",
                command_id, model, seq, phase, f": {reason}" if reason else "",
                extra={k: v for k, v in fields.items() if v is not None})
        event = Progress(worker_id=self.worker_id, command_id=command_id, model=model, seq=seq, phase=phase,
                         reason=reason, seconds=seconds, at=datetime.now(UTC))
        await self._publish(self.topology.progress_key(model, self.worker_id), event)

    async def _heartbeats(self) -> None:
        while True:
            await self._publish(self.topology.heartbeat_key(self.worker_id), self.heartbeat())
            await asyncio.sleep(self.heartbeat_interval_s)

    def status(self) -> ControlStatus:
        return ControlStatus(
            applied_seq=dict(self.applied_seq), last_error=self.last_error,
            unusable=self.manager.unusable_everywhere(),
            cleanups=[CleanupRecord(version=c.version, memory_before=c.memory_before, memory_after=c.memory_after)
                      for c in self.manager.cleanups[-5:]],
        )

    def heartbeat(self) -> Heartbeat:
        cache = self.manager.artifacts
        # What peers may ask this worker for, and what they may wait for it to have (worker.runtime.peers).
        held, fetching = (cache.held(), cache.fetching()) if cache and self.peer_url else ([], [])
        return Heartbeat(worker_id=self.worker_id, at=datetime.now(UTC), models=self.model_status(),
                         last_error=self.last_error, peer_url=self.peer_url, artifacts=held, fetching=fetching,
                         evidence=self.evidence.report() if self.evidence else {})

    def model_status(self) -> dict[str, ModelStatus]:
        statuses = {}
        for deployment in self.manager.table.all():
            weights = deployment.weights or {deployment.active.version: 100.0}
            versions = {
                name: VersionStatus(state=v.state.value, reason=v.reason, weight=weights.get(name, 0.0),
                                    in_flight=v.in_flight)
                for name, v in deployment.loaded.items()
            }
            versions.update(
                (name, VersionStatus(state=w.version.state.value, reason=w.version.reason, on_demand=True,
                                     in_flight=w.version.in_flight,
                                     last_used=datetime.fromtimestamp(w.last_used, UTC)))
                for name, w in deployment.on_demand.items()
            )
            for name, reason in self.manager.unusable(deployment.model).items():
                versions.setdefault(name, VersionStatus(state="failed", reason=reason))
            statuses[deployment.model] = ModelStatus(
                active=deployment.active.version, versions=versions, shadow=deployment.shadow,
                last_seq=self.applied_seq.get(deployment.model, 0), rollout=self._rollout_of(deployment.model),
            )
        return statuses

    def _rollout_of(self, model: str) -> RolloutMark | None:
        """The rollout step the newest applied command is, if it is one (a later command by hand ends it)."""
        applied = self.applied_seq.get(model, 0)
        newest = max((c for c in self.logs.get(model, []) if c.seq <= applied), key=lambda c: c.seq, default=None)
        return newest.rollout if newest is not None else None

    async def _publish(self, routing_key: str, event: Progress | Heartbeat) -> None:
        if self._status is None:
            return
        try:
            message = aio_pika.Message(self.signer.sign_event(event), content_type="application/json",
                                       type=PROGRESS_TYPE if isinstance(event, Progress) else HEARTBEAT_TYPE)
            await self._status.publish(message, routing_key, mandatory=False)  # nobody listening is fine
        except Exception as exc:  # status is best effort; the control log is the truth
            log.debug("status event not sent: %s", exc)


def _rollout_reason(command: Command) -> str | None:
    """What a rollout step says in its progress events: an abort's reason above all."""
    mark = command.rollout
    if mark is None:
        return None
    if mark.phase == "aborted":
        return f"rollout {mark.rollout_id} aborted ({mark.gate or 'operator'}): {mark.reason or 'no reason given'}"
    return f"rollout {mark.rollout_id}: {mark.phase}" + (f" ({mark.reason})" if mark.reason else "")


def _target_version(command: Command) -> str | None:
    """The version a command asks for, where it names one (a rollback to the previous one does not)."""
    match command.action:
        case Update(version=version):
            return version
        case Rollback(to=to):
            return to
    return None
