"""Causal self-attention behind one small adapter: SDPA or flash-attn.

Both take q, k, v as (B, T, H, D) and return (B, T, H, D). SDPA gets
``is_causal=True`` and no mask tensor: a materialised mask costs memory, and
letting PyTorch detect causality from a mask costs a device-to-host sync.
flash-attn's ``flash_attn_func`` takes the (B, T, H, D) layout natively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=True
    )  # (B, H, T, D)
    return out.transpose(1, 2)


def flash_attn_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)


CAUSAL_ATTENTION = {"sdpa": sdpa_causal, "flash_attn": flash_attn_causal}
