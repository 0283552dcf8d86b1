"""Draw a result's boxes onto its image, for people to look at."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from schemas.jobs import JobResult

_COLOURS = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72)]


def draw_detections(image_path: Path, result: JobResult, out_dir: Path) -> Path:
    image = cv2.imdecode(np.fromfile(str(image_path), np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{image_path} is not an image")
    thickness = max(1, round(min(image.shape[:2]) / 200))
    for d in result.detections:
        colour = _COLOURS[d.class_id % len(_COLOURS)]
        top_left = (round(d.box.x1), round(d.box.y1))
        cv2.rectangle(image, top_left, (round(d.box.x2), round(d.box.y2)), colour, thickness)
        label = f"{d.class_name} {d.score:.2f}"
        cv2.putText(image, label, (top_left[0], max(10, top_left[1] - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.3 * thickness, colour, max(1, thickness // 2), cv2.LINE_AA)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{image_path.stem}.annotated.png"
    cv2.imwrite(str(out), image)
    return out
