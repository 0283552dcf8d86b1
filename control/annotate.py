"""Draw a result onto its image, for people to look at: boxes with labels, masks as coloured
overlays, keypoints with their skeleton, face landmarks, human-parsing parts with a legend.

Small images are scaled up first (nearest neighbour, so pixels stay visible as pixels): a label
drawn on a 128-px image is unreadable at any font size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from schemas.jobs import Detection, JobResult
from schemas.outputs import FaceOutput, Keypoint, ParsingOutput, PoseOutput, Rle, SegmentOutput
from worker.runtime.masks import decode_masks

Canvas = npt.NDArray[np.uint8]
Colour = tuple[int, int, int]

_COLOURS: list[Colour] = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207),
                          (10, 249, 72), (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0),
                          (168, 153, 44), (255, 194, 0), (147, 69, 52), (255, 115, 100), (236, 24, 0)]
#: Images are drawn on at least this many pixels on their short side.
MIN_CANVAS = 480
FONT = cv2.FONT_HERSHEY_SIMPLEX


def colour(index: int) -> Colour:
    return _COLOURS[index % len(_COLOURS)]


def draw_result(image_path: Path, result: JobResult, out_dir: Path, suffix: str = "annotated") -> Path:
    """Write `<stem>.<suffix>.png` into `out_dir` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{image_path.stem}.{suffix}.png"
    cv2.imwrite(str(out), annotated(image_path, result))
    return out


def side_by_side(image_path: Path, results: Sequence[JobResult], out_dir: Path) -> Path:
    """One picture per result, left to right, each titled with its model: `<stem>.side-by-side.png`."""
    panels = []
    for result in results:
        panel = annotated(image_path, result)
        _label(panel, f"{result.model}/{result.version} ({result.task})", (6, panel.shape[0] - 8), (40, 40, 40))
        panels.append(panel)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{image_path.stem}.side-by-side.png"
    cv2.imwrite(str(out), np.hstack(panels))
    return out


def annotated(image_path: Path | bytes, result: JobResult) -> Canvas:
    """The image (a file, or its encoded bytes: the web console's uploads), scaled up if small, with
    the result drawn on it."""
    encoded = np.frombuffer(image_path, np.uint8) if isinstance(image_path, bytes) else np.fromfile(
        str(image_path), np.uint8)
    image = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{'the upload' if isinstance(image_path, bytes) else image_path} is not an image")
    scale = max(1.0, MIN_CANVAS / min(image.shape[:2]))
    height, width = image.shape[:2]
    canvas: Canvas = np.ascontiguousarray(image, dtype=np.uint8)
    if scale > 1:
        canvas = np.ascontiguousarray(cv2.resize(image, (round(width * scale), round(height * scale)),
                                                 interpolation=cv2.INTER_NEAREST), dtype=np.uint8)
    output = result.output
    match output:
        case SegmentOutput(masks=masks):
            _overlay(canvas, masks, [colour(d.class_id) for d in result.detections], (height, width))
        case ParsingOutput(parts=parts):
            _overlay(canvas, [p.mask for p in parts], [colour(p.class_id) for p in parts], (height, width))
            _legend(canvas, [(p.class_name, colour(p.class_id)) for p in parts])
    for i, detection in enumerate(result.detections):
        _box(canvas, detection, scale)
        if isinstance(output, PoseOutput | FaceOutput):
            points = output.keypoints[i] if isinstance(output, PoseOutput) else output.landmarks[i]
            _points(canvas, points, scale, output.skeleton if isinstance(output, PoseOutput) else ())
    return canvas


def _overlay(canvas: Canvas, masks: Sequence[Rle], colours: Sequence[Colour], size: tuple[int, int]) -> None:
    if not masks:
        return
    decoded = decode_masks(list(masks), size)
    tinted = canvas.copy()
    for mask, tint in zip(decoded, colours, strict=True):
        big = cv2.resize(mask.astype(np.uint8), (canvas.shape[1], canvas.shape[0]),
                         interpolation=cv2.INTER_NEAREST).astype(bool)
        tinted[big] = tint
    cv2.addWeighted(tinted, 0.45, canvas, 0.55, 0, dst=canvas)


def _box(canvas: Canvas, detection: Detection, scale: float) -> None:
    tint = colour(detection.class_id)
    b = detection.box
    top_left = (round(b.x1 * scale), round(b.y1 * scale))
    cv2.rectangle(canvas, top_left, (round(b.x2 * scale), round(b.y2 * scale)), tint, 2)
    _label(canvas, f"{detection.class_name} {detection.score:.2f}", top_left, tint)


def _label(canvas: Canvas, text: str, at: tuple[int, int], tint: Colour) -> None:
    """Text on a filled box of its colour, above `at` where there is room, else inside."""
    (w, h), base = cv2.getTextSize(text, FONT, 0.5, 1)
    x, y = at
    y = y - 4 if y - h - base - 4 >= 0 else y + h + 4
    cv2.rectangle(canvas, (x, y - h - 3), (x + w + 4, y + base - 1), tint, -1)
    ink = (0, 0, 0) if sum(tint) > 380 else (255, 255, 255)
    cv2.putText(canvas, text, (x + 2, y - 1), FONT, 0.5, ink, 1, cv2.LINE_AA)


def _points(canvas: Canvas, points: Sequence[Keypoint], scale: float,
            skeleton: Sequence[tuple[int, int]]) -> None:
    seen = [(round(p.x * scale), round(p.y * scale)) if p.visibility >= 0.5 else None for p in points]
    for a, b in skeleton:
        if a < len(seen) and b < len(seen) and (pa := seen[a]) is not None and (pb := seen[b]) is not None:
            cv2.line(canvas, pa, pb, (255, 255, 255), 2, cv2.LINE_AA)
    for i, point in enumerate(seen):
        if point is not None:
            cv2.circle(canvas, point, 4, colour(i + 3), -1, cv2.LINE_AA)


def _legend(canvas: Canvas, entries: Sequence[tuple[str, Colour]]) -> None:
    for row, (name, tint) in enumerate(dict.fromkeys(entries)):
        _label(canvas, name, (6, 24 + row * 22), tint)
