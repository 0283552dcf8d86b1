"""TorchScript traces of networks, one per architecture, reused by every version of it.

Why trace: a traced forward runs in C++ without the GIL, so a worker's event loop and its
inference thread really run side by side, and eager PyTorch's per-module Python dispatch is gone.

Why reuse: every `torch.jit.trace` registers TorchScript types in a process-wide compilation
unit that is never freed (measured here: about 8 MB per trace, 16 MB once it has run), so a
worker tracing each version it loads would grow with every update (invariant 4). Instead the
first network of an architecture is traced once as a template; each load deep-copies the
template (same types, same compiled graphs), loads its own weights into the copy, and checks the
copy against the eager network before it may serve. The template keeps one set of weights.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

from worker.runtime.templates import Templates

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_templates: Templates[torch.jit.ScriptModule] = Templates()


class TraceMismatch(RuntimeError):
    """A traced copy does not compute what its network computes."""


def traced(network: torch.nn.Module, example: torch.Tensor, architecture: object,
           settings: tuple[torch.Tensor, ...] = ()) -> torch.jit.ScriptModule:
    """A traced module computing what `network` (in eval mode, a tensor or a tuple of them out) computes.

    `example` is its input (the check feeds it random values of the example's type and shape);
    `settings` are further inputs passed as given, to the trace and to the check (a threshold).
    `architecture` names what the trace bakes in besides the weights' shapes (a model's
    configuration, its strides): networks with equal ones share a template.
    """
    def trace() -> torch.jit.ScriptModule:
        module = _trace(network, (example, *settings))
        log.info("traced a new architecture (%d before it in this process)", len(_templates))
        return module

    module = _templates.copy_of(_described(network, example, architecture), trace)
    module.load_state_dict(network.state_dict())
    _check(module, network, example, settings)
    return module


def _trace(network: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    import torch

    with torch.inference_mode(), warnings.catch_warnings():
        # TorchScript warns about Python-side shape checks it records as constants; the caller
        # makes such code paths shape-independent before tracing.
        warnings.simplefilter("ignore")
        module: torch.jit.ScriptModule = torch.jit.trace(network, inputs, check_trace=False)  # type: ignore[no-untyped-call]
        return module


def _check(module: torch.jit.ScriptModule, network: torch.nn.Module, example: torch.Tensor,
           settings: tuple[torch.Tensor, ...]) -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    if example.dtype.is_floating_point:
        probe = torch.rand(example.shape, generator=generator, dtype=example.dtype)
    else:  # images: bytes
        probe = torch.randint(0, 256, example.shape, generator=generator).to(example.dtype)
    inputs = (probe.to(example.device), *settings)
    with torch.inference_mode():
        pairs = list(zip(_outputs(module(*inputs)), _outputs(network(*inputs)), strict=True))
    for ours, theirs in pairs:
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
            worst = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
            raise TraceMismatch(f"the traced network differs from the eager one by up to {worst:.3g}")


def _outputs(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # A network may answer several tensors (a segment network's predictions and mask prototypes).
    return output if isinstance(output, tuple) else (output,)


def _described(network: torch.nn.Module, example: torch.Tensor, architecture: object) -> list[Any]:
    weights: list[Any] = [(name, list(t.shape), str(t.dtype)) for name, t in network.state_dict().items()]
    return [type(network).__qualname__, architecture, weights, list(example.shape[1:]), str(example.device)]
