"""Non-maximum suppression of a whole batch of YOLO predictions, row for row ultralytics'.

`ultralytics.utils.nms.non_max_suppression` filters, converts and concatenates each image's
candidates in a loop of a dozen tensor operations per image, each a Python-to-C++ round trip that
gives the GIL up and takes it back (and waits for it whenever the event loop holds it). Here it is
two halves. `candidates` is batch-wide tensor operations (the filtering, the box conversion, the best
class), traced into the served network (`ultralytics_backend.ServedNetwork`), so they run inside its
one call. `suppress` is numpy on the few rows that are left, per image, which never gives the GIL
up for arrays that small. The arithmetic is the same operations on the same float32 values, so the
rows kept are bit-identical (tests hold them to ultralytics' function): the settings the predictors
of the detect, segment and pose tasks use (best class only, class-aware, no class filter).

The suppression is torchvision's CPU kernel, step for step, in float32 numpy (`greedy_nms`):
importing torchvision (its CUDA build) adds 190 MiB to a process's resident memory, and without
it ultralytics falls back to a pure-torch NMS that took 1.2 ms for 40 boxes (torchvision 15 µs).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from ultralytics.utils.ops import xywh2xyxy

#: ultralytics' per-class coordinate offset: boxes of different classes never overlap in NMS.
MAX_WH = 7680
#: ultralytics' cap on the candidates one image sends to NMS (the most confident ones).
MAX_NMS = 30000

Rows = npt.NDArray[np.float32]


def candidates(predictions: torch.Tensor, conf: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of every image whose best class score passes `conf`, as (x1, y1, x2, y2, score,
    class, extra...), all images' in one tensor, and how many rows each image has.

    `predictions`: (batch, 4 + classes + extra, anchors), the network's output. `conf` is a 0-d
    float32 tensor, so that a trace keeps it an input (compared in float32, as a Python float is)."""
    rows = predictions.transpose(-1, -2)  # (batch, anchors, channels), a view
    # ultralytics keeps candidates whose best score passes, then takes the best class of each: the
    # same maximum, taken once.
    score, best = rows[..., 4:4 + classes].max(2, keepdim=True)
    candidate = score[..., 0] > conf
    found = rows[candidate]
    found = torch.cat((xywh2xyxy(found[:, :4]), score[candidate], best[candidate].float(), found[:, 4 + classes:]), 1)
    return found, candidate.sum(1)


def suppress(found: torch.Tensor, counts: torch.Tensor, iou: float, max_det: int) -> list[Rows]:
    """Each image's rows kept, best first, on the host: `candidates`' answer (from any device)."""
    kept = []
    for image in np.split(found.cpu().numpy(), np.cumsum(counts.tolist())[:-1]):
        if len(image) > MAX_NMS:  # torch's own sort, as ultralytics': equal scores keep its order
            image = image[torch.from_numpy(image[:, 4]).argsort(descending=True)[:MAX_NMS].numpy()]
        if len(image):
            boxes = image[:, :4] + image[:, 5:6] * np.float32(MAX_WH)
            image = image[greedy_nms(boxes, image[:, 4], iou)[:max_det]]
        kept.append(image)
    return kept


def batch_nms(predictions: torch.Tensor, conf: float, iou: float, max_det: int, nc: int = 0) -> list[Rows]:
    """Each image's kept rows, as ultralytics' `non_max_suppression(predictions, conf, iou,
    max_det=max_det, nc=nc)` gives them; `nc` 0 means every channel after the box is a class score."""
    found, counts = candidates(predictions, torch.tensor(conf, dtype=torch.float32), nc or predictions.shape[1] - 4)
    return suppress(found, counts, iou, max_det)


def greedy_nms(boxes: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou: float) -> npt.NDArray[np.int64]:
    """Indices of the boxes (x1, y1, x2, y2) kept, best score first: what `torchvision.ops.nms`
    answers on the CPU. The same float32 operations in the same order (its `nms_kernel`): scores
    sorted stably, and a box suppressed by a kept one when their intersection over
    (kept area + its area - intersection) exceeds `iou`."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    width = np.maximum(np.float32(0), np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1))
    height = np.maximum(np.float32(0), np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1))
    inter = width * height
    # The ratio in float32, compared in double as C++ compares a float with the double threshold.
    overlaps = (inter / (areas[:, None] + areas - inter)).astype(np.float64) > iou
    suppressed = np.zeros(len(boxes), dtype=np.bool_)
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if not suppressed[i]:
            kept.append(i)
            suppressed |= overlaps[i]
    return np.asarray(kept, dtype=np.int64)
