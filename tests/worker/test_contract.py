"""An update may not change what producers get back by surprise; a version states what it needs;
a version that loads but cannot run is refused at validation."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from control.client import Client
from control.operator import Operator
from schemas.control import Update
from schemas.manifest import Manifest
from schemas.outputs import ClassifyOutput
from schemas.signing import KeyFiles
from worker.runtime.repository import sha256_of
from worker.runtime.trivial_backend import write_trivial_model

if TYPE_CHECKING:
    from conftest import ServeInProcess, StartLoad


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


#: YOLOv8n-cls at 64 px: its last backbone map is 2 × 2.
CLASSIFIER_INPUT = 64
#: A layer acting across the feature map's width, sized for the 224 px input it was made for
#: (a 7 × 7 map there): nothing checks it until an image goes through.
WIDTH_MIXER_FOR_224_PX = [-1, 1, "nn.Linear", [7, 7]]


def _write_classifier(root: Path, version: str, extra_layers: list[list[Any]]) -> Path:
    """`cls/<version>`: a seeded YOLOv8n-cls on three classes, weights as safetensors, served at
    64 px, with `extra_layers` appended to its backbone."""
    import torch
    from safetensors.torch import save_file
    from ultralytics.nn.tasks import ClassificationModel, yaml_model_load

    architecture = yaml_model_load("yolov8n-cls.yaml")
    architecture["backbone"] += extra_layers
    torch.manual_seed(0)
    network = ClassificationModel(copy.deepcopy(architecture), nc=3, verbose=False)
    directory = root / "cls" / version
    directory.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in network.state_dict().items()}, directory / "model.safetensors")
    manifest = Manifest(name="cls", version=version, backend="ultralytics", task="classify",
                        artifact="model.safetensors", format="safetensors",
                        architecture=json.loads(json.dumps(network.yaml)),
                        sha256=sha256_of(directory / "model.safetensors"),
                        classes={0: "circle", 1: "square", 2: "triangle"}, input_size=CLASSIFIER_INPUT,
                        created_at=datetime(2026, 1, 1, tzinfo=UTC))
    (directory / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    return directory


async def test_a_version_that_fails_at_its_first_forward_is_refused_while_the_current_one_serves(
    serve_in_process: ServeInProcess, operator: Operator, load: StartLoad, control_keys: KeyFiles, tmp_path: Path,
    bus_jpg: Path
) -> None:
    """Through the real ultralytics backend: 1.1.0's weights fit its architecture exactly (it loads),
    but its manifest serves it at 64 px, and its first forward pass, the warm-up, fails."""
    root = tmp_path / "m"
    _write_classifier(root, "1.0.0", [])
    _write_classifier(root, "1.1.0", [WIDTH_MIXER_FOR_224_PX])
    await serve_in_process("cls@1.0.0", model_root=root, control_public_key=control_keys.control_public)
    running = load(concurrency=2, images=[bus_jpg], model="cls")
    await running.wait_for(5)
    before = len(running.results)
    report = await operator.publish_and_wait("cls", Update(version="1.1.0"), timeout_s=60)
    during = len(running.results)
    await running.wait_for(during + 5)
    assert not report.ok and len(report.failures) == 1, f"1.1.0 was not refused: {report.progress}"
    ((worker, reason),) = report.failures.items()
    assert reason.startswith("failed: cls/1.1.0: "), reason
    assert "first forward failed" in reason and "Expected size for first two dimensions" in reason, reason
    # It loaded: refused in validation, not at preload.
    assert [p.phase for p in report.progress[worker]][-3:] == ["preload", "validate", "failed"], report.progress
    results = await running.stop()  # asserts: none lost, none failed
    assert during > before, "no job was served while 1.1.0 was tried"
    assert {r.version for r in results} == {"1.0.0"}
    assert all(isinstance(r.output, ClassifyOutput) and len(r.output.top) == 3 for r in results)
