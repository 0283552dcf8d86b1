"""Non-maximum suppression of a whole batch of YOLO predictions, row for row ultralytics'.

`ultralytics.utils.nms.non_max_suppression` filters, converts and concatenates each image's
candidates in a loop of a dozen tensor operations per image, each a Python-to-C++ round trip that
takes the GIL back from the event loop. Here the filtering, the box conversion and the best class
are batch-wide operations and only torchvision's NMS itself runs per image: 53 against 154 µs of
the inference thread per image at batch 16 (shapes 128 px, one thread; the README's Performance
section). The arithmetic is the same operations on the same values, so the rows kept are
bit-identical (tests hold them to ultralytics' function): the settings the predictors of the
detect, segment and pose tasks use (best class only, class-aware, no class filter).
"""

from __future__ import annotations

import torch
import torchvision
from ultralytics.utils.ops import xywh2xyxy

#: ultralytics' per-class coordinate offset: boxes of different classes never overlap in NMS.
MAX_WH = 7680
#: ultralytics' cap on the candidates one image sends to NMS (the most confident ones).
MAX_NMS = 30000


def batch_nms(predictions: torch.Tensor, conf: float, iou: float, max_det: int, nc: int = 0) -> list[torch.Tensor]:
    """Each image's kept rows (x1, y1, x2, y2, score, class, extra...), as ultralytics'
    `non_max_suppression(predictions, conf, iou, max_det=max_det, nc=nc)` gives them.

    `predictions`: (batch, 4 + classes + extra, anchors), the network's output; `nc` 0 means every
    channel after the box is a class score."""
    classes = nc or predictions.shape[1] - 4
    extra = predictions.shape[1] - classes - 4
    rows = predictions.transpose(-1, -2)  # (batch, anchors, channels), a view
    # ultralytics keeps candidates whose best score passes, then takes the best class of each: the
    # same maximum, taken once.
    score, best = rows[..., 4:4 + classes].max(2, keepdim=True)
    candidate = score[..., 0] > conf
    counts = candidate.sum(1).tolist()
    found = rows[candidate]
    found = torch.cat((xywh2xyxy(found[:, :4]), score[candidate], best[candidate].float(), found[:, 4 + classes:]), 1)
    kept = []
    for image in torch.split(found, counts):
        if len(image) > MAX_NMS:
            image = image[image[:, 4].argsort(descending=True)[:MAX_NMS]]
        if len(image):
            keep = torchvision.ops.nms(image[:, :4] + image[:, 5:6] * MAX_WH, image[:, 4], iou)[:max_det]
            image = image[keep]
        kept.append(image if len(image) else torch.zeros((0, 6 + extra), device=predictions.device))
    return kept
