"""The in-projection with RoPE on q and k, in eager PyTorch kernels: the fast
path's rotary where no Triton kernel runs (CPU) and nothing is compiled (the
training step).

rotate_half pairs feature j of a head with feature j + D/2, so each head's two
halves are strips of D/2 floats, and an eager kernel walks them strip by
strip (the reference: 7 kernels per tensor forward, about twice as many
backward); on the CPU the strips cost more than the arithmetic.

Here the rows of in_proj's weight and bias are reordered so that the
projection itself produces q and k with each pair side by side, (j, j + D/2)
-> (2j, 2j + 1). The rotation is then a complex multiply by e^(i angle) over
whole rows: one kernel for q and k together each way, in place forward. The
reorder is a gather of a (3d, d) matrix per layer; attention never sees it,
because q.k sums the same products whatever feature order q and k share (the
same reordering converts Llama checkpoints between interleaved and
rotate_half RoPE). Measured on 2 CPU cores, alternating in one process, the
rotary_qk training step at the CPU benchmark shape: 106.4 -> 102.9 ms against
the previous eager rotation (4 strip kernels per tensor each way), which had
itself saved ~2.5% on the reference math.

The complex multiply rounds as the reference does (each product rounded, then
one sum), and backward is the rotation by the negative angle (a rotation's
transpose).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmfast import backends
from wmfast import functional as WF

Tensor = torch.Tensor

# tokens (batch * length) from which the reordered projection runs. Below,
# its fixed costs per layer (the weight gather, the angle table, a Python
# autograd.Function) outweigh what it saves. Measured on 2 CPU cores, in-
# projection + RoPE forward and backward, alternating with the reference
# math: 128 tokens 0.86-0.94x (d_model 64 and 128), 256 tokens 1.03-1.08x,
# 512 tokens 1.29x, the CPU benchmark shape (4096 tokens) 1.18x.
MIN_FUSED_TOKENS = 256


def interleaved_rows(d_model: int, n_heads: int, device: torch.device) -> Tensor:
    """(3 d_model,) indices: in_proj's rows with each q and k head's features
    ordered (0, D/2, 1, D/2 + 1, ...); the v rows unchanged.

    Built per call (a few tiny ops) rather than cached: a cached index first
    made under torch.inference_mode would be an inference tensor, which a
    later training step's index_select cannot save for backward."""
    head_dim = d_model // n_heads
    half = torch.arange(head_dim // 2, device=device)
    within = torch.stack((half, half + head_dim // 2), dim=1).flatten()  # (D,)
    starts = torch.arange(2 * n_heads, device=device).unsqueeze(1) * head_dim  # q, then k heads
    qk_rows = (starts + within).flatten()  # (2 d_model,)
    return torch.cat((qk_rows, torch.arange(2 * d_model, 3 * d_model, device=device)))


def _qk_pairs(qkv: Tensor, seq_len: int, n_heads: int) -> Tensor:
    """q and k of the projection's output (B*T, 3d) as (B, T, 2H, D/2) complex:
    a view, so writes through it land in ``qkv``."""
    tokens, three_d = qkv.shape
    half = three_d // (6 * n_heads)
    pairs = qkv.view(tokens // seq_len, seq_len, 3, n_heads, half, 2)[:, :, :2]
    return torch.view_as_complex(pairs).view(tokens // seq_len, seq_len, 2 * n_heads, half)


class _RotateInterleavedQK(torch.autograd.Function):
    """q and k in the projection's output times ``rot``, in place: nothing needs
    their unrotated values (in_proj's backward reads x and the weight, the
    rotation's backward only the angles). In place on the output itself, not
    on a view of it (F.linear's 3-D output is one): autograd would copy the
    whole tensor to rebase a view."""

    @staticmethod
    def forward(ctx, qkv: Tensor, rot: Tensor, n_heads: int) -> Tensor:
        ctx.shape = (rot.shape[0], n_heads)  # (T, H)
        _qk_pairs(qkv, *ctx.shape).mul_(rot)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(rot)
        return qkv

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rot,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same rotation, recorded
            grad_qkv = grad.clone(memory_format=torch.contiguous_format)
            _qk_pairs(grad_qkv, *ctx.shape).mul_(rot.conj())
            return grad_qkv, None, None
        grad = grad.contiguous()
        grad_qkv = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        torch.mul(_qk_pairs(grad, *ctx.shape), rot.conj(), out=_qk_pairs(grad_qkv, *ctx.shape))
        v = slice(2 * grad.shape[-1] // 3, None)
        grad_qkv[:, v].copy_(grad[:, v])
        return grad_qkv, None, None


def rotated_qkv(
    x: Tensor, weight: Tensor, bias: Tensor | None, n_heads: int, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The attention in-projection of x (B, T, d) with RoPE on q and k: q, k, v
    each (B, T, H, D). cos, sin: (T, D/2) fp32, as transformer_forward has them.

    q and k come back with each head's features in the interleaved order
    (both alike, so attention computes the same scores); v in its own order.
    Only fp32 with at least MIN_FUSED_TOKENS tokens, with tables that need no
    gradient, where ``backends.eager_functions_allowed`` (no torch.compile,
    torch.func transform or autocast), takes the complex multiply; every other
    case runs the reference math in the reference order.
    """
    batch, seq_len, d_model = x.shape
    head_dim = d_model // n_heads
    # eager_functions_allowed first: under torch.compile it ends the test
    # before the size comparison, which would otherwise become a guard on
    # batch * seq_len and recompile a dynamic graph where it flips
    fused = (
        backends.eager_functions_allowed(x.device.type)
        and batch * seq_len >= MIN_FUSED_TOKENS
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not (cos.requires_grad or sin.requires_grad)
    )
    if not fused:
        q, k, v = F.linear(x, weight, bias).view(batch, seq_len, 3, n_heads, head_dim).unbind(2)
        q, k = WF.rotary_qk(q, k, cos, sin)
        return q, k, v
    rows = interleaved_rows(d_model, n_heads, x.device)
    weight = weight.index_select(0, rows)
    tokens = x.reshape(batch * seq_len, d_model)
    if bias is None:
        qkv = tokens.mm(weight.t())  # (B*T, 3d)
    else:
        qkv = torch.addmm(bias.index_select(0, rows), tokens, weight.t())
    # (T, 2H, D/2): one angle per position for every head of q and k,
    # materialised so that the multiply runs over whole rows instead of
    # strips of D/2
    rot = torch.complex(cos, sin).unsqueeze(-2).expand(-1, 2 * n_heads, -1).contiguous()
    qkv = _RotateInterleavedQK.apply(qkv, rot, n_heads)
    return qkv.view(batch, seq_len, 3, n_heads, head_dim).unbind(2)
