"""The MogFace story with the fast ULFD face model: new weights without a restart, a rollback, a
broken version refused while the old one serves, traffic split by user, a shadow that measures
how far two versions agree. Two worker processes, continuous load, the real broker."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from control.client import Client
from control.operator import Operator, WaitReport
from schemas.control import Rollback, Shadow, Traffic, Update
from schemas.outputs import FaceOutput

if TYPE_CHECKING:
    from conftest import Metric, StartLoad, StartWorker

pytestmark = pytest.mark.slow

PHOTOS = ("bus.jpg", "zidane.jpg")


@pytest.fixture
def photos(bus_jpg: Path) -> list[Path]:
    return [bus_jpg.parent / name for name in PHOTOS]


def _assert_ok(report: WaitReport, workers: set[str]) -> None:
    assert set(report.workers) == workers and report.ok, (report.missing, report.failures)


#: What each worker reports for 0.9.0-broken, whose classification head has another layout's shape.
BROKEN_REASON = ("failed: faces/0.9.0-broken: modelscope could not load model.safetensors: ",
                 "size mismatch for classification_headers.3.weight")


async def test_faces_refusal_update_and_rollback_under_load(
    start_worker: StartWorker, operator: Operator, load: StartLoad, photos: list[Path]
) -> None:
    start_worker("faces@1.0.0", name="a"), start_worker("faces@1.0.0", name="b")
    running = load(concurrency=4, images=photos, model="faces")
    await running.wait_for(20)
    # While 1.0.0 serves: the broken version is refused by each worker with its error, and 1.0.0 serves on.
    before = len(running.results)
    broken = await operator.publish_and_wait("faces", Update(version="0.9.0-broken"), timeout_s=120)
    assert not broken.ok and set(broken.failures) == {"a", "b"}, broken.failures
    for worker, reason in broken.failures.items():
        assert reason.startswith(BROKEN_REASON[0]) and BROKEN_REASON[1] in reason, (worker, reason)
    await running.wait_for(len(running.results) + 20)
    during = [result for _, result in running.results[before:]]
    assert len(during) >= 20 and all(r.status == "ok" and r.version == "1.0.0" for r in during), \
        Counter((r.status, r.version) for r in during)

    _assert_ok(await operator.publish_and_wait("faces", Update(version="2.0.0"), timeout_s=120), {"a", "b"})
    await running.wait_for(len(running.results) + 20)
    _assert_ok(await operator.publish_and_wait("faces", Rollback(), timeout_s=120), {"a", "b"})
    await running.wait_for(len(running.results) + 20)
    results = await running.stop()  # asserts: nothing lost, nothing failed
    versions = Counter(r.version for r in results)
    assert set(versions) == {"1.0.0", "2.0.0"} and results[-1].version == "1.0.0", versions
    assert all(r.task == "face-detection" and isinstance(r.output, FaceOutput) for r in results)
    assert all(r.detections for r in results), "the zoo's face versions find faces on both photos"
    by_version = {v: {tuple(round(d.box.x1) for d in r.detections) for r in results if r.version == v}
                  for v in versions}
    assert by_version["1.0.0"] != by_version["2.0.0"], "two versions answered alike"


async def test_faces_split_by_user_and_shadow_agreement(
    start_worker: StartWorker, operator: Operator, client: Client, photos: list[Path], metric: Metric
) -> None:
    worker = start_worker("faces@1.0.0", name="a")
    _assert_ok(await operator.publish_and_wait("faces", Update(version="2.0.0", activate="standby"),
                                               timeout_s=120), {"a"})
    split = Traffic(weights={"1.0.0": 50, "2.0.0": 50}, shadow=Shadow(version="2.0.0", percent=100))
    _assert_ok(await operator.publish_and_wait("faces", split), {"a"})
    users = [f"user-{i}" for i in range(40)]
    first = await asyncio.gather(*(client.submit(photos[0], model="faces", routing_key=u) for u in users))
    again = await asyncio.gather(*(client.submit(photos[1], model="faces", routing_key=u) for u in users))
    assert [r.version for r in first] == [r.version for r in again], "a user stays on one version"
    shares = Counter(r.version for r in first)
    assert set(shares) == {"1.0.0", "2.0.0"}, shares
    await asyncio.sleep(1.0)  # shadow runs finish after their results
    metrics = worker.text("/metrics")
    count = metric(metrics, "hotswap_shadow_agreement_ratio_count", primary="1.0.0", shadow="2.0.0")
    total = metric(metrics, "hotswap_shadow_agreement_ratio_sum", primary="1.0.0", shadow="2.0.0")
    print(f"face agreement 1.0.0 vs 2.0.0 over {count:.0f} shadow runs: mean {total / max(count, 1):.2f}")
    assert count > 0 and total / count < 1.0, "versions whose faces differ must not agree fully"
