"""An update may not change what producers get back by surprise; a version states what it needs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from control.client import Client
from control.operator import Operator
from schemas.control import Update
from schemas.signing import KeyFiles
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import ServeInProcess


def _models(root: Path) -> Path:
    write_trivial_model(root, "1.0.0", whole_image=True)
    write_trivial_model(root, "2.0.0", whole_image=True, classes={0: "person"})  # renames class 0
    write_trivial_model(root, "3.0.0", whole_image=True, requires=["hotswap-no-such-package>=1"])
    write_trivial_model(root, "4.0.0", whole_image=True, requires=["pydantic<1"])
    return root


async def test_a_changed_contract_is_refused_unless_the_update_says_so(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, control_keys: KeyFiles, tmp_path: Path,
    bus_jpg: Path
) -> None:
    await serve_in_process(model_root=_models(tmp_path / "m"), control_public_key=control_keys.control_public)
    refused = await operator.publish_and_wait("trivial", Update(version="2.0.0"), timeout_s=30)
    (reason,) = refused.failures.values()
    assert not refused.ok and "classes {0: thing} → {0: person}" in reason and "--new-contract" in reason
    still = await client.submit(bus_jpg, model="trivial")
    assert (still.version, [d.class_name for d in still.detections]) == ("1.0.0", ["thing"])

    allowed = await operator.publish_and_wait("trivial", Update(version="2.0.0", new_contract=True), timeout_s=30)
    assert allowed.ok, allowed.failures
    after = await client.submit(bus_jpg, model="trivial")
    assert (after.version, [d.class_name for d in after.detections]) == ("2.0.0", ["person"])


async def test_a_version_whose_requirements_are_not_met_is_refused_naming_them(
    serve_in_process: ServeInProcess, operator: Operator, client: Client, control_keys: KeyFiles, tmp_path: Path,
    bus_jpg: Path
) -> None:
    await serve_in_process(model_root=_models(tmp_path / "m"), control_public_key=control_keys.control_public)
    misses = {"3.0.0": "hotswap-no-such-package>=1 (not installed)", "4.0.0": "pydantic<1 (installed: 2."}
    for version, why in misses.items():
        report = await operator.publish_and_wait("trivial", Update(version=version), timeout_s=30)
        (reason,) = report.failures.values()
        assert not report.ok and why in reason, reason
    served = await client.submit(bus_jpg, model="trivial")
    assert (served.status, served.version) == ("ok", "1.0.0")
