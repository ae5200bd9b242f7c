"""Which implementation runs where: the fast variant's fixed rules, in one place.

A rule depends only on the device, the grad mode, the options the user chose
and what is installed: never on timings taken at run time, so a rerun always
takes the same path. ``wmfast.fast.describe(model)`` and ``wmfast check``
report what the rules picked.

=============  ===========================================================
choice         rule for "auto"
=============  ===========================================================
rotary         "triton" on CUDA tensors of a KERNEL_DTYPES dtype when
               triton is installed, else
               "torch" (the same math in PyTorch, in few kernels when not
               compiled: wmfast.ops.rotary_eager; on CPU the Triton
               interpreter would be far slower than PyTorch). One
               exception: the "rotary" (embedding rotation) model's
               compiled training step takes "torch", which measured
               faster there (COMPILED_TRAINING_EMBEDDING_ROTATION below)
attention      "flash_attn" on CUDA with fp16/bf16 inputs when the
               flash-attn package is installed, else "sdpa"
               (scaled_dot_product_attention, is_causal=True)
compile        CUDA: always. CPU: only with grad disabled (inference):
               measured on 2 cores, torch.compile makes the no-grad
               forward 1.7x faster but the training step 0.8x slower.
norm           "triton" (wmfast.ops.layer_norm: layer_norm(x + dropout(y))
               in one pass forward and one backward, with the bf16 copy
               for the next products) in compiled CUDA calls with grad
               enabled, for weights of a KERNEL_DTYPES dtype, when triton
               is installed; else "torch" (as the
               reference writes it; compiled, Inductor fuses it). H100,
               SIR shape, bf16: the op's forward + backward 1.36 ms against
               Inductor's 1.99, the training step 21.0 ms against 23.2
               (bench/results/README.md, "h100-2"). Its forward alone is
               ~9% slower than Inductor's, and at a small shape the op
               called eagerly lost to PyTorch's eager composition (host
               work, measured while eager calls still went through
               torch.library): so not for no-grad or uncompiled calls.
               At d_mlp 0 "triton" takes both add & norms of a layer
               in one pass (FUSED_NORMS_AT_D_MLP_0 below).
recurrence     "bptt" (wmfast.ops.rnn_eager: ATen's RNN op forward, the
               backward through time written out) for the Elman RNN on
               the CPU when autograd records the call, for fp32 or fp64
               weights; else "module": the reference's own nn.RNN /
               nn.LSTM call (cuDNN on CUDA; oneDNN's fused LSTM on the
               CPU). Measured on 2 cores, the RNN training step 1.08-1.76x
               the reference's from B 2, T 8, d 16 up (1.29-1.62x at the
               CPU benchmark shape; 0.99x, a tie, at B 1, T 4, d 8).
output_layer   (RNN/LSTM) "answer rows" (wmfast.ops.output_layer_eager: the
               backward's products on the rows of the logits' gradient
               that are nonzero, workingmem's answers, from the size its
               MIN_PRODUCTS fixes) on the CPU when autograd records the
               call; else "module". The
               transformers' fast path does the same in its last layer
               (wmfast.ops.tail_eager). On CUDA finding the rows would be
               a host-device sync.
=============  ===========================================================

Where nothing is compiled (the CPU training step), the forward takes
wmfast.ops' eager Functions (rotary_eager, mlp_eager, tail_eager) from the
sizes their modules fix (the MIN_* constants, measured once and written
down there), when ``eager_functions_allowed`` below says they may run.

Under a torch.func transform (grad, vmap, jacrev, ...) or forward-mode AD
the fast forward runs the plain math, uncompiled, whatever the rules say:
wmfast's autograd Functions and custom ops define no functorch rules and no
jvps.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

ROTARY_IMPLS = ("auto", "triton", "torch")
NORM_IMPLS = ("auto", "torch", "triton")
ATTENTION_IMPLS = ("auto", "sdpa", "flash_attn")
COMPILE_CHOICES = ("auto", "always", "never")

# The storage dtypes wmfast's Triton kernels take (kernels/_triton.py's
# STORAGE_DTYPES, named here so that this module imports no triton). "auto"
# picks a kernel only for these: an fp64 model (a ground truth for error
# budgets) runs the torch math instead of failing in the kernel's dtype check.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# The "rotary" model's compiled training step on CUDA takes the torch math for
# its embedding rotation: Inductor compiles it into the neighbouring kernels,
# and the step measured 22.50 ms against 22.84 with the Triton op (H100, SIR
# shape, bf16; bench/results "h100-2"). It is not there for correctness:
# `wmfast check --device cuda` once found layer 0's gradients up to 0.14 off
# with the Triton op, but for the check's inputs one ReLU input in layer 0 is
# 2.2e-8 from zero, and 1-ulp changes of the rotation's output (the fused
# kernel rounds differently from PyTorch's separate ops) flip it. On the CPU,
# with the reference alone, such changes flip it in 2 of 12 random draws and
# then move linear1's weight gradient by 0.1123: the gap the H100 showed
# (bench/results/README.md, "h100-3"). An explicit rotary="triton" is kept.
COMPILED_TRAINING_EMBEDDING_ROTATION = "torch"

# With rotary="triton" (and not rotating in place), the rotary_qk model takes
# q, k and v from the packed projection through
# wmfast.ops.rotary.rotary_qkv_packed, whose backward writes the projection's
# gradient whole. rotary_qk's own backward writes q's and k's gradients into
# new tensors, which autograd then stacks with v's into that gradient (the
# stack: 0.42 ms a layer at the SIR shape in bf16, bench/results "h100-3"
# profile): by bytes, ~0.29 ms a layer more. Not yet timed on a GPU: the
# model benchmark's "fast_unpacked_rotary" runs the same model with this off.
PACKED_ROTARY_QK_GRADIENT = True

# At d_mlp 0 (workingmem's default) a layer's feed-forward block is linear2's
# bias, so norm="triton" runs its two add & norms as one op
# (wmfast.ops.bias_ffn_norms): at the SIR shape in bf16 it moves 18 bytes per
# element each way where two single passes move 30 forward and 34 backward,
# and the two single passes took 4.6 of the 20 ms step's kernel time (H100,
# bench/results "h100-3" profile). Not yet timed on a GPU: the model
# benchmark's "fast_single_norms" runs the same model with this off.
FUSED_NORMS_AT_D_MLP_0 = True


def resolve_rotary(
    choice: str,
    device: torch.device,
    dtype: torch.dtype,
    positional: str | None = None,
    compiled_training: bool = False,
) -> str:
    """ "triton" or "torch" for rotary math on ``device`` for tensors of
    ``dtype``; ``positional`` is the model's positional type,
    ``compiled_training`` whether the call is a compiled one with grad
    enabled."""
    if choice == "triton" and not triton_installed():
        raise ImportError(
            "rotary='triton' needs triton: pip install 'wmfast[triton]' (or use rotary='torch')"
        )
    if choice == "triton":
        _check_kernel_dtype("rotary", dtype)
    if choice != "auto":
        return choice
    if positional == "rotary" and compiled_training:
        return COMPILED_TRAINING_EMBEDDING_ROTATION
    return "triton" if _kernels_take(device, dtype) else "torch"


def resolve_norm(
    choice: str, device: torch.device, dtype: torch.dtype, compiled_training: bool = False
) -> str:
    """ "torch" or "triton" for the add & norm after each block, for weights of
    ``dtype``; ``compiled_training``: a compiled call with grad enabled."""
    if choice == "auto":
        return "triton" if compiled_training and _kernels_take(device, dtype) else "torch"
    if choice == "triton" and not triton_installed():
        raise ImportError(
            "norm='triton' needs triton: pip install 'wmfast[triton]' (or use norm='torch')"
        )
    if choice == "triton":
        _check_kernel_dtype("norm", dtype)
    return choice


def _check_kernel_dtype(option: str, dtype: torch.dtype) -> None:
    """An explicit "triton" choice for weights the kernels cannot take is a
    clear error at the model's level, not the kernel's (never a fallback:
    the user asked for the kernel)."""
    if dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        raise TypeError(
            f"{option}='triton' runs wmfast's Triton kernels, which take {names}; this model "
            f"computes in {str(dtype).removeprefix('torch.')}: use {option}='auto' (which takes "
            f"the PyTorch math for it) or {option}='torch'"
        )


def _kernels_take(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether "auto" may pick a Triton kernel for tensors of ``dtype`` on ``device``."""
    return device.type == "cuda" and dtype in KERNEL_DTYPES and triton_installed()


def resolve_attention(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """ "flash_attn" or "sdpa" for causal attention on ``device`` in ``dtype``."""
    if choice == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        use_flash = device.type == "cuda" and half and flash_attn_installed()
        return "flash_attn" if use_flash else "sdpa"
    if choice == "flash_attn" and not flash_attn_installed():
        raise ImportError("attention='flash_attn' needs the flash-attn package (or use 'sdpa')")
    return choice


def recurrent_calls_modules(input_ids: torch.Tensor) -> bool:
    """Whether a recurrent model's call on ``input_ids`` runs its modules
    whatever else holds: the two rules below pick code of their own only for
    CPU calls that autograd records. The fast runner asks this first; it
    builds no torch.device, since at small sizes the runner's host time
    showed (no-grad forward at B 8, T 32, d 32 on 2 cores: 0.94x of the
    reference with the whole plan asked, 0.98x with a torch.device built
    here, 1.00x as written)."""
    return not (input_ids.is_cpu and torch.is_grad_enabled())


def resolve_recurrence(
    model_class: str, device: torch.device, dtype: torch.dtype, records_grad: bool
) -> str:
    """ "bptt" or "module" for the recurrence of a ``model_class`` ("rnn" or
    "lstm") model with weights of ``dtype``; ``records_grad``: whether
    autograd records the call."""
    cpu_training = device.type == "cpu" and records_grad
    if model_class == "rnn" and cpu_training and dtype in (torch.float32, torch.float64):
        return "bptt"
    return "module"


def resolve_output_layer(device: torch.device, records_grad: bool) -> str:
    """ "answer rows" or "module" for a recurrent model's output layer."""
    return "answer rows" if device.type == "cpu" and records_grad else "module"


def resolve_compile(choice: str, device: torch.device, grad_enabled: bool) -> bool:
    """Whether the untraced forward runs compiled."""
    if choice == "auto":
        return device.type == "cuda" or (device.type == "cpu" and not grad_enabled)
    return choice == "always"


def plain_math_required() -> bool:
    """Whether a torch.func transform (per-sample gradients, Jacobians) or
    forward-mode AD (``torch.autograd.forward_ad``'s dual tensors) is
    running. wmfast's autograd Functions define neither functorch rules nor
    jvps, so either would make them refuse; the plain math runs instead.
    (The first is the question torch.autograd.Function.apply asks; forward
    AD's level is a module global of torch.autograd.forward_ad, -1 outside
    ``dual_level()``.)"""
    return (
        torch._C._are_functorch_transforms_active()
        or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
    )


def eager_functions_allowed(device_type: str) -> bool:
    """Whether wmfast's eager autograd Functions (wmfast.ops.*_eager) may run
    instead of the plain math they replace: not while torch.compile traces
    (Inductor fuses the plain math itself), not under a torch.func transform
    or forward-mode AD (plain_math_required), not under autocast (dtypes
    would change between their forward and backward)."""
    return not (
        torch.compiler.is_compiling()
        or plain_math_required()
        or torch.is_autocast_enabled(device_type)
    )
