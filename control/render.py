"""A job result as tables on the terminal: its detections, and what its task adds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from schemas.jobs import JobResult
from schemas.outputs import (
    ClassifyOutput,
    FaceOutput,
    Keypoint,
    ParsingOutput,
    PoseOutput,
    SegmentOutput,
    TaskOutput,
)
from worker.runtime.masks import mask_area

#: Rows a table shows before it says how many more there are (`--json` has them all).
MAX_ROWS = 12


def print_result(image: str, result: JobResult, console: Console) -> None:
    where = f"{result.model}/{result.version or '?'} on {result.worker_id}"
    if result.error is not None:
        console.print(f"[bold]{image}[/bold]: [red]{result.error.code}[/red] {result.error.message} ({where})")
        return
    output = result.output
    task = output.task if output is not None else "detect"
    title = f"{image} — {task}, {where}, {result.timings.total_ms:.1f} ms"
    if isinstance(output, ClassifyOutput):
        console.print(_classes(title, output))
        return
    console.print(_detections(title, result, output))
    if isinstance(output, ParsingOutput):
        console.print(_parts(output))


def _detections(title: str, result: JobResult, output: TaskOutput | None) -> Table:
    extra = _extra_column(output)
    table = Table(title=title, title_justify="left")
    for column in ("class", "score", "x1", "y1", "x2", "y2", *([extra] if extra else [])):
        table.add_column(column, justify="left" if column in ("class", extra) else "right")
    for i, d in enumerate(result.detections[:MAX_ROWS]):
        b = d.box
        cells = [d.class_name, f"{d.score:.2f}", *(f"{v:.1f}" for v in (b.x1, b.y1, b.x2, b.y2))]
        table.add_row(*cells, *([_extra_cell(output, i)] if extra else []))
    if len(result.detections) > MAX_ROWS:
        table.add_row(f"… {len(result.detections) - MAX_ROWS} more", *[""] * (5 + bool(extra)))
    if not result.detections:
        table.add_row("(nothing)", *[""] * (5 + bool(extra)))
    return table


def _extra_column(output: TaskOutput | None) -> str | None:
    match output:
        case SegmentOutput():
            return "mask px"
        case PoseOutput():
            return "keypoints seen"
        case FaceOutput():
            return "landmarks"
        case ParsingOutput(persons=persons) if persons:
            return "person px"
    return None


def _extra_cell(output: TaskOutput | None, i: int) -> str:
    match output:
        case SegmentOutput(masks=masks):
            return str(mask_area(masks[i]))
        case PoseOutput(keypoints=points, keypoint_names=names):
            seen = [name for name, p in zip(names, points[i], strict=False) if p.visibility >= 0.5]
            return f"{len(seen)}/{len(points[i])}: {', '.join(seen)}" if seen else f"0/{len(points[i])}"
        case FaceOutput(landmarks=points):
            return _coordinates(points[i]) if points[i] else "(none given)"
        case ParsingOutput(persons=persons):
            return str(mask_area(persons[i]))
    return ""


def _coordinates(points: list[Keypoint]) -> str:
    return " ".join(f"({p.x:.0f},{p.y:.0f})" for p in points)


def _parts(output: ParsingOutput) -> Table:
    table = Table(title="parts", title_justify="left")
    for column in ("part", "score", "pixels"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part in output.parts:
        table.add_row(part.class_name, f"{part.score:.2f}", str(mask_area(part.mask)))
    if not output.parts:
        table.add_row("(nothing)", "", "")
    return table


def _classes(title: str, output: ClassifyOutput) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("score", justify="right")
    for entry in output.top:
        table.add_row(entry.class_name, f"{entry.score:.3f}")
    return table
