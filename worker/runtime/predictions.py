"""What a backend returns for one image: plain numpy arrays, in that image's pixels.

The inference thread builds nothing else: no pydantic models, no RLE. The job processor turns a
`Prediction` into the wire result once, at the edge (`worker.outputs`); the evaluators
(`worker.runtime.evaluation`) compare predictions as arrays. Which fields a task fills:

| task           | boxes, scores, class_ids | masks          | keypoints        | parts | probs |
|----------------|--------------------------|----------------|------------------|-------|-------|
| detect         | objects                  |                |                  |       |       |
| segment        | objects                  | one per object |                  |       |       |
| pose           | persons                  |                | (n, k, 3)        |       |       |
| face-detection | faces                    |                | (n, 5, 3) or None|       |       |
| human-parsing  | persons, where given     | one per person |                  | yes   |       |
| classify       | (empty)                  |                |                  |       | yes   |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
Masks = npt.NDArray[np.bool_]


def _floats(values: Any, shape: tuple[int, ...]) -> Floats:
    array = np.asarray(values, dtype=np.float32)
    return array.reshape(shape) if array.size == 0 else array


@dataclass(frozen=True, eq=False)
class Parts:
    """Labelled masks that are not objects: body parts and garments (human parsing)."""

    class_ids: Ints
    scores: Floats
    masks: Masks  # (m, height, width)

    def __post_init__(self) -> None:
        if not len(self.class_ids) == len(self.scores) == len(self.masks):
            raise ValueError("parts: class_ids, scores and masks differ in length")


@dataclass(frozen=True, eq=False)
class Prediction:
    boxes: Floats  # (n, 4): x1, y1, x2, y2
    scores: Floats  # (n,)
    class_ids: Ints  # (n,)
    masks: Masks | None = None  # (n, height, width)
    keypoints: Floats | None = None  # (n, k, 3): x, y, visibility
    parts: Parts | None = None
    probs: Floats | None = None  # (classes,)

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or len(self.scores) != n or len(self.class_ids) != n:
            raise ValueError(f"boxes {self.boxes.shape}, scores {len(self.scores)} and class ids "
                             f"{len(self.class_ids)} do not describe the same objects")
        for name, extra in (("masks", self.masks), ("keypoints", self.keypoints)):
            if extra is not None and len(extra) != n:
                raise ValueError(f"{len(extra)} {name} for {n} objects")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def of(cls, boxes: Any = (), scores: Any = (), class_ids: Any = (), **extra: Any) -> Prediction:
        """From anything array-like (lists, tensors already on the CPU)."""
        return cls(_floats(boxes, (0, 4)), _floats(scores, (0,)), np.asarray(class_ids, dtype=np.int64).reshape(-1),
                   **extra)

    @classmethod
    def from_rows(cls, rows: npt.NDArray[Any], **extra: Any) -> Prediction:
        """From (n, 6) rows of x1, y1, x2, y2, score, class id, as YOLO's NMS gives them."""
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, 6)
        return cls(rows[:, :4].copy(), rows[:, 4].copy(), rows[:, 5].astype(np.int64), **extra)

    @classmethod
    def empty(cls) -> Prediction:
        return cls.of()


def boxes_of(masks: Masks) -> Floats:
    """The tight box around each mask (empty masks get a zero box)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes
