"""When the Triton ops may skip torch.library: the rule, in one place.

The registered ops (``torch.library`` custom_op / triton_op) are what
torch.compile and tensor modes need: fake kernels, Inductor's view of the
kernel, dispatch through FakeTensorMode or FlopCounterMode. Called eagerly,
their dispatch is host work of its own: a forward + backward of rotary_qk
on 2 CPU cores, the kernel launch stubbed out, took 320-380 us through the
registered op both ways and ~130 us through a plain
``torch.autograd.Function`` around the same launcher. On an H100 that host
work, not the kernels, set the op's forward + backward time at the SIR
shapes (bench/results/README.md, "h100-2"). So eager calls on plain tensors
take the Function, everything else the registered op; and an eager call
that records no graph (no_grad, or a backward without create_graph) calls the
launcher alone.
"""

from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def launch_eagerly(*tensors: torch.Tensor) -> bool:
    """True outside torch.compile, with no tensor mode active, on plain tensors."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and all(type(t) in _PLAIN for t in tensors)
    )


def records_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd would record a call on these tensors: otherwise an
    eager call skips the autograd.Function (~70 us of host work a call on 2
    CPU cores) and launches directly."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
