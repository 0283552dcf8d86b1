from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from ultralytics.utils.nms import non_max_suppression

from worker.runtime import yolo_nms
from worker.runtime.yolo_nms import batch_nms


def _predictions(batch: int, classes: int, extra: int, anchors: int, seed: int) -> torch.Tensor:
    """Network-shaped output (batch, 4 + classes + extra, anchors): boxes in clusters, so that NMS
    has overlaps to suppress, and scores spread around the thresholds."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 2, 8, generator=generator) * 120
    pick = torch.randint(0, 8, (batch, 1, anchors), generator=generator).expand(-1, 2, -1)
    xy = centres.gather(2, pick) + torch.randn(batch, 2, anchors, generator=generator) * 3
    wh = 10 + torch.rand(batch, 2, anchors, generator=generator) * 30
    scores = torch.rand(batch, classes, anchors, generator=generator) ** 3
    rest = torch.randn(batch, extra, anchors, generator=generator)
    return torch.cat((xy, wh, scores, rest), 1)


@pytest.mark.parametrize(("classes", "extra"), [(3, 0), (1, 0), (2, 32), (1, 51)])
def test_the_rows_kept_are_ultralytics_own(classes: int, extra: int) -> None:
    """Detect (several classes, one class), segment (32 mask coefficients) and pose (17 keypoints
    × 3) shaped outputs: every image's rows equal to the bit what ultralytics' NMS keeps."""
    predictions = _predictions(6, classes, extra, 336, seed=classes + extra)
    predictions[2, 4:4 + classes] = 0  # an image with nothing above the threshold
    nc = classes if extra else 0
    for conf, iou, max_det in ((0.25, 0.7, 300), (0.1, 0.45, 5), (0.6, 0.7, 300)):
        theirs = non_max_suppression(predictions.clone(), conf, iou, max_det=max_det, nc=nc)
        ours = batch_nms(predictions.clone(), conf, iou, max_det, nc)
        assert len(ours) == len(theirs) == 6
        assert sum(len(rows) for rows in theirs) > 6, "the case should keep something"
        assert any(len(rows) == max_det for rows in theirs) or max_det == 300
        for mine, reference in zip(ours, theirs, strict=True):
            assert mine.shape == reference.shape and np.array_equal(mine, reference.numpy())


def test_an_image_with_more_candidates_than_nms_takes_keeps_the_most_confident(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    predictions = _predictions(2, 3, 0, 400, seed=7)
    monkeypatch.setattr(yolo_nms, "MAX_NMS", 50)
    theirs = non_max_suppression(predictions.clone(), 0.05, 0.7, max_det=300, max_nms=50)
    ours = batch_nms(predictions.clone(), 0.05, 0.7, 300)
    for mine, reference in zip(ours, theirs, strict=True):
        assert np.array_equal(mine, reference.numpy())


@pytest.mark.parametrize("seed", range(6))
def test_the_suppression_is_torchvisions(seed: int) -> None:
    """`greedy_nms` against `torchvision.ops.nms` itself: clustered boxes, tied scores, thresholds
    that float32 rounds down (0.7, 0.45) and up (0.1: its float32 is above it)."""
    generator = torch.Generator().manual_seed(seed)
    n = 60
    centres = (torch.rand(6, 2, generator=generator) * 100)[torch.randint(0, 6, (n,), generator=generator)]
    half = (5 + torch.rand(n, 2, generator=generator) * 20) / 2
    boxes = torch.cat((centres - half, centres + half), 1)
    scores = torch.randint(0, 12, (n,), generator=generator).float() / 12  # many ties
    for iou in (0.7, 0.45, 0.5, 0.1, 0.9):
        theirs = torchvision.ops.nms(boxes, scores, iou)
        ours = yolo_nms.greedy_nms(boxes.numpy(), scores.numpy(), iou)
        assert ours.tolist() == theirs.tolist(), iou


def test_an_overlap_equal_to_the_threshold_in_float32_is_judged_as_torchvision_judges_it() -> None:
    """0.1's float32 is above 0.1: a box inside another with a tenth of its area overlaps it by
    exactly that float32 (10 / 100, correctly rounded), which exceeds the (double) threshold for
    torchvision, and must for `greedy_nms` too."""
    import numpy as np
    import torchvision

    boxes = np.array([[0, 0, 10, 10], [0, 0, 1, 10]], dtype=np.float32)
    scores = np.array([0.9, 0.8], dtype=np.float32)
    theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.1).tolist()
    assert theirs == [0], "torchvision keeps both: the case does not test the comparison"
    assert yolo_nms.greedy_nms(boxes, scores, 0.1).tolist() == theirs
