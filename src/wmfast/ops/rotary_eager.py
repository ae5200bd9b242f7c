"""RoPE on q and k in few eager PyTorch kernels: the fast path's rotary where
no Triton kernel runs (CPU) and nothing is compiled (the training step).

The reference (``wmfast.functional.rotary_qk``) is written for clarity: per
tensor it launches 7 kernels forward (4 products, a sum, a difference, a cat)
and about twice as many in autograd's backward. Here each rotated half is one
product and one ``addcmul_`` written straight into the output, and backward is
the same rotation by the negative angle (a rotation's transpose), so
forward and backward each take 4 kernels per tensor. Measured on 2 CPU cores,
training step of the CPU benchmark shape, rotary_qk: about 2.5% faster.

Under torch.compile the reference math is used instead: Inductor fuses it into
one loop anyway, and out= writes into slices would only get in its way.
"""

from __future__ import annotations

import torch

from wmfast import functional as WF

Tensor = torch.Tensor


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """Rotate the pairs (j, j + D/2) of x (..., H, D) by +angle (sign 1) or
    -angle (sign -1); cos, sin (..., 1, D/2) fp32 broadcast over the heads."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1)
    out1.addcmul_(x2, sin, value=-sign)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=out2)
    out2.addcmul_(x1, sin, value=sign)  # x2 cos + x1 sin
    return out


class _RotaryQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1.0), _rotate(k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_q, cos, sin, -1.0), _rotate(grad_k, cos, sin, -1.0), None, None


def rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``wmfast.functional.rotary_qk`` computed in fewer kernels (same signature:
    q, k (B, T, H, D) any strides; cos, sin (B or 1, T, D/2) or (T, D/2) fp32).

    Only fp32 q/k with tables that need no gradient take the fused kernels:
    writing fp32 products into bf16 outputs would round mid-formula, and the
    tables' gradient is the reference's job (traced models edit them). Every
    other case, and code being compiled, runs the reference.
    """
    fused = (
        q.dtype == torch.float32
        and k.dtype == torch.float32
        and not (cos.requires_grad or sin.requires_grad)
        and not torch.compiler.is_compiling()
    )
    if not fused:
        return WF.rotary_qk(q, k, cos, sin)
    return _RotaryQK.apply(q, k, cos.unsqueeze(-2), sin.unsqueeze(-2))
