"""Masks as COCO run-length encodings (pycocotools), the form they travel and are stored in."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from schemas.outputs import Rle
from worker.runtime.predictions import Masks


def encode_masks(masks: Masks) -> list[Rle]:
    if len(masks) == 0:
        return []
    encoded = coco_mask.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    return [Rle(size=(int(e["size"][0]), int(e["size"][1])), counts=e["counts"].decode("ascii")) for e in encoded]


def decode_masks(rles: list[Rle], size: tuple[int, int]) -> Masks:
    """(n, height, width) booleans; `size` gives the shape when there are none."""
    if not rles:
        return np.zeros((0, *size), dtype=np.bool_)
    raw = [{"size": list(r.size), "counts": r.counts.encode("ascii")} for r in rles]
    with warnings.catch_warnings():  # pycocotools' Cython predates NumPy 2's copy keyword; harmless here
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        decoded: np.ndarray[Any, Any] = coco_mask.decode(raw)
    return decoded.transpose(2, 0, 1).astype(np.bool_)


def mask_area(rle: Rle) -> int:
    """Pixels in the mask, counted from the encoding without decoding it."""
    return int(coco_mask.area({"size": list(rle.size), "counts": rle.counts.encode("ascii")}))
