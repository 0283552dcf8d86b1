"""A stand-in for the one piece of `mmcv` that modelscope's M2FP human parser imports.

M2FP's pixel decoder (`modelscope...maskdino.ms_deform_attn`) imports
`MultiScaleDeformableAttnFunction` and `multi_scale_deformable_attn_pytorch` from
`mmcv.ops.multi_scale_deform_attn` at module level. mmcv ships no wheels on the package registry
for this torch, and building it needs a CUDA toolchain; yet modelscope only calls the compiled op
inside `try:` and falls back to the pure-PyTorch function whenever it raises, which is what it
does on every CPU anyway. So the compiled op here always raises, and the fallback is mmcv's own
pure-PyTorch implementation (Apache-2.0, `mmcv/ops/multi_scale_deform_attn.py`), unchanged in
what it computes.

`install()` puts these modules into `sys.modules` only where a real mmcv cannot be imported: a
worker that has mmcv keeps it (and its CUDA kernel).
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import types
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

MODULES = ("mmcv", "mmcv.ops", "mmcv.ops.multi_scale_deform_attn")


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor, value_spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by `grid_sample`, level by level (mmcv's CPU path)."""
    batch, _, heads, dims = value.shape
    _, queries, heads, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    per_level = torch.split(value, [h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's coordinates run from -1 to 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        level_value = per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, dims, h, w)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(batch, heads * dims, queries)
    return output.transpose(1, 2).contiguous()


class MultiScaleDeformableAttnFunction:
    """mmcv's compiled op, absent: raising sends modelscope to its pure-PyTorch fallback."""

    @staticmethod
    def apply(*_args: Any) -> NoReturn:
        raise NotImplementedError("mmcv's compiled multi-scale deformable attention is not installed")


def install() -> bool:
    """Provide `mmcv.ops.multi_scale_deform_attn` unless mmcv is importable; True when the stand-in is in use."""
    existing = sys.modules.get("mmcv")
    if isinstance(existing, _StandIn):
        return True
    if existing is not None or importlib.util.find_spec("mmcv") is not None:
        return False
    modules = [_StandIn(name) for name in MODULES]
    modules[-1].multi_scale_deformable_attn_pytorch = multi_scale_deformable_attn_pytorch  # type: ignore[attr-defined]
    modules[-1].MultiScaleDeformableAttnFunction = MultiScaleDeformableAttnFunction  # type: ignore[attr-defined]
    for parent, child in itertools.pairwise(modules):
        setattr(parent, child.__name__.rsplit(".", 1)[1], child)
        parent.__path__ = []  # a package, so that `import mmcv.ops...` looks into sys.modules
    for module in modules:
        sys.modules[module.__name__] = module
    return True


class _StandIn(types.ModuleType):
    """Marks the modules as this stand-in, not mmcv."""
