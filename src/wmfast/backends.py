"""Which implementation runs where: the fast variant's fixed rules, in one place.

A rule depends only on the device, the grad mode, the options the user chose
and what is installed: never on timings taken at run time, so a rerun always
takes the same path. ``wmfast.fast.describe(model)`` and ``wmfast check``
report what the rules picked.

=============  ===========================================================
choice         rule for "auto"
=============  ===========================================================
rotary         "triton" on CUDA tensors when triton is installed, else
               "torch" (the same math in PyTorch, in few kernels when not
               compiled: wmfast.ops.rotary_eager; on CPU the Triton
               interpreter would be far slower than PyTorch). One
               exception, also to an explicit "triton": on CUDA with grad
               enabled, the "rotary" (embedding rotation) model's
               rotation takes "torch", compiled or not, traced or not
               (CUDA_EMBEDDING_ROTATION_WITH_GRAD below)
attention      "flash_attn" on CUDA with fp16/bf16 inputs when the
               flash-attn package is installed, else "sdpa"
               (scaled_dot_product_attention, is_causal=True)
compile        CUDA: always. CPU: only with grad disabled (inference):
               measured on 2 cores, torch.compile makes the no-grad
               forward 1.7x faster but the training step 0.8x slower.
norm           "triton" (wmfast.ops.layer_norm: layer_norm(x + dropout(y))
               in one pass forward and one backward, with the bf16 copy
               for the next products) in compiled CUDA calls with grad
               enabled when triton is installed; else "torch" (as the
               reference writes it; compiled, Inductor fuses it). H100,
               SIR shape, bf16: the op's forward + backward 1.36 ms against
               Inductor's 1.99, the training step 21.0 ms against 23.2
               (bench/results/README.md, "h100-2"). Its forward alone is
               ~9% slower than Inductor's, and at a small shape the op
               called eagerly lost to PyTorch's eager composition (host
               work, measured while eager calls still went through
               torch.library): so not for no-grad or uncompiled calls.
=============  ===========================================================

Where nothing is compiled (the CPU training step), the forward takes
wmfast.ops' eager Functions (rotary_eager, mlp_eager, tail_eager) from the
sizes their modules fix (the MIN_* constants, measured once and written
down there), when ``eager_functions_allowed`` below says they may run.

Under a torch.func transform (grad, vmap, jacrev, ...) the fast forward runs
the plain math, uncompiled, whatever the rules say: wmfast's autograd
Functions and custom ops define no functorch rules.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

ROTARY_IMPLS = ("auto", "triton", "torch")
NORM_IMPLS = ("auto", "torch", "triton")
ATTENTION_IMPLS = ("auto", "sdpa", "flash_attn")
COMPILE_CHOICES = ("auto", "always", "never")


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# The embedding rotation's Triton op gives wrong gradients on CUDA at wmfast
# check's size (H100, torch 2.11, triton 3.6): the "rotary" model's logits and
# layer 1 are exact, but the embedding's and layer 0's attention, linear1 and
# norm1 gradients are off by up to 0.14 (relative 0.1 and more), while layer
# 0's norm2 and linear2 are exact. tools/rotary_grad_probe.py ("h100-3")
# found it the same uncompiled, in a compiled graph through the triton_op and
# through the opaque op; the same op on CPU (Triton interpreter), under
# no_grad on CUDA, rotary_qk's op, and the kernels' own CUDA tests at small
# shapes all match their references. Until a GPU run isolates the cause, any
# call that will take gradients through it on CUDA takes the reference's math.
CUDA_EMBEDDING_ROTATION_WITH_GRAD = "torch"


def resolve_rotary(
    choice: str,
    device: torch.device,
    positional: str | None = None,
    with_grad: bool = False,
) -> str:
    """ "triton" or "torch" for rotary math on ``device``; ``positional`` is the
    model's positional type, ``with_grad`` whether the call records gradients."""
    if choice == "triton" and not triton_installed():
        raise ImportError(
            "rotary='triton' needs triton: pip install 'wmfast[triton]' (or use rotary='torch')"
        )
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and triton_installed() else "torch"
    if choice == "triton" and positional == "rotary" and with_grad and device.type == "cuda":
        return CUDA_EMBEDDING_ROTATION_WITH_GRAD
    return choice


def resolve_norm(choice: str, device: torch.device, compiled_training: bool = False) -> str:
    """ "torch" or "triton" for the add & norm after each block;
    ``compiled_training``: a compiled call with grad enabled."""
    if choice == "auto":
        use_triton = device.type == "cuda" and compiled_training and triton_installed()
        return "triton" if use_triton else "torch"
    if choice == "triton" and not triton_installed():
        raise ImportError(
            "norm='triton' needs triton: pip install 'wmfast[triton]' (or use norm='torch')"
        )
    return choice


def resolve_attention(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """ "flash_attn" or "sdpa" for causal attention on ``device`` in ``dtype``."""
    if choice == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        use_flash = device.type == "cuda" and half and flash_attn_installed()
        return "flash_attn" if use_flash else "sdpa"
    if choice == "flash_attn" and not flash_attn_installed():
        raise ImportError("attention='flash_attn' needs the flash-attn package (or use 'sdpa')")
    return choice


def resolve_compile(choice: str, device: torch.device, grad_enabled: bool) -> bool:
    """Whether the untraced forward runs compiled."""
    if choice == "auto":
        return device.type == "cuda" or (device.type == "cpu" and not grad_enabled)
    return choice == "always"


def functorch_transforms_active() -> bool:
    """Whether a torch.func transform is running (the question
    torch.autograd.Function.apply asks before it refuses a Function without
    functorch support)."""
    return torch._C._are_functorch_transforms_active()


def eager_functions_allowed(device_type: str) -> bool:
    """Whether wmfast's eager autograd Functions (wmfast.ops.*_eager) may run
    instead of the plain math they replace: not while torch.compile traces
    (Inductor fuses the plain math itself), not under a torch.func transform
    (they define no functorch rules), not under autocast (dtypes would change
    between their forward and backward)."""
    return not (
        torch.compiler.is_compiling()
        or functorch_transforms_active()
        or torch.is_autocast_enabled(device_type)
    )
