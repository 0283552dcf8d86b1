"""What a model found, by task: the `output` of a job result.

One discriminated union, keyed by `task`. Every task that finds objects lists them, box, class
and score, in the result's `detections`, exactly as detection results always have; `output`
carries what the task adds, one entry per detection and in the same order: an instance mask
(segment), named keypoints (pose), five face landmarks (face-detection). Human parsing adds
labelled part masks, and per-person masks where the model gives them; a classifier adds its top
classes. A producer written for detection keeps reading `detections` from any model.

Masks are COCO run-length encodings in the original image's pixels (`pycocotools.mask.decode`
reads them, and every language has a decoder): `size` is [height, width], `counts` the compressed
string, column-major as COCO defines it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The five face landmarks, in the order RetinaFace, MTCNN and the modelscope face detectors give them.
#: "left" is the image's left (the subject's right): on a frontal face left_eye.x < right_eye.x.
FACE_LANDMARKS: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rle(_Wire):
    """A binary mask as COCO's compressed run-length encoding."""

    size: tuple[int, int] = Field(description="height, width of the image the mask covers")
    counts: str = Field(description="COCO compressed RLE (pycocotools.mask.encode), column-major")


class Keypoint(_Wire):
    x: float
    y: float
    visibility: float = Field(description="the model's confidence that the point is visible, 0 to 1")


class DetectOutput(_Wire):
    task: Literal["detect"] = "detect"


class SegmentOutput(_Wire):
    task: Literal["segment"] = "segment"
    masks: list[Rle] = Field(description="one instance mask per detection, in its order")


class PoseOutput(_Wire):
    task: Literal["pose"] = "pose"
    keypoint_names: list[str] = Field(description="the manifest's keypoint names, in order")
    skeleton: list[tuple[int, int]] = Field(default=[], description="keypoint index pairs a drawing joins")
    keypoints: list[list[Keypoint]] = Field(description="per detection, one point per keypoint name")


class FaceOutput(_Wire):
    task: Literal["face-detection"] = "face-detection"
    landmark_names: list[str] = Field(default=list(FACE_LANDMARKS), description="the landmarks, in order")
    landmarks: list[list[Keypoint]] = Field(description="per detected face, one point per landmark name; "
                                            "empty lists when the model gives no landmarks")


class LabelledMask(_Wire):
    class_id: int
    class_name: str
    score: float
    mask: Rle


class ParsingOutput(_Wire):
    task: Literal["human-parsing"] = "human-parsing"
    parts: list[LabelledMask] = Field(description="one mask per body part or garment label found")
    persons: list[Rle] = Field(default=[], description="one mask per person (its detection, same order), "
                               "where the model tells persons apart")


class ClassScore(_Wire):
    class_id: int
    class_name: str
    score: float


class ClassifyOutput(_Wire):
    task: Literal["classify"] = "classify"
    top: list[ClassScore] = Field(description="best classes first")


TaskOutput = Annotated[
    DetectOutput | SegmentOutput | PoseOutput | FaceOutput | ParsingOutput | ClassifyOutput,
    Field(discriminator="task"),
]


def per_detection(output: TaskOutput) -> int | None:
    """How many entries `output` holds per detection (masks, keypoints, landmarks, persons), or None
    when its entries are not tied to detections."""
    match output:
        case SegmentOutput(masks=masks):
            return len(masks)
        case PoseOutput(keypoints=points):
            return len(points)
        case FaceOutput(landmarks=points):
            return len(points)
        case ParsingOutput(persons=persons) if persons:
            return len(persons)
    return None
