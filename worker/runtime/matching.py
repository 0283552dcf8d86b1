"""Matching detections: recall against expectations (validation) and agreement (shadow runs)."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.jobs import Box, Detection


def matched(expected: Sequence[tuple[str, Box]], found: Sequence[Detection], min_iou: float = 0.5) -> int:
    """How many expected (class, box) pairs a detection of the same class covers, one each."""
    used: set[int] = set()
    count = 0
    for name, box in expected:
        best, best_iou = None, min_iou
        for i, detection in enumerate(found):
            overlap = detection.box.iou(box)
            if i not in used and detection.class_name == name and overlap >= best_iou:
                best, best_iou = i, overlap
        if best is not None:
            used.add(best)
            count += 1
    return count


def agreement(primary: Sequence[Detection], other: Sequence[Detection], min_iou: float = 0.5) -> float:
    """Share of boxes both agree on (same class, IoU ≥ min_iou): 1.0 when both found nothing."""
    if not primary and not other:
        return 1.0
    pairs = matched([(d.class_name, d.box) for d in primary], other, min_iou)
    return pairs / max(len(primary), len(other))
