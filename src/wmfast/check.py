"""``wmfast check``: run every built-in default model and report.

This first version builds each model class and positional type at a small
size, runs it on seeded random token ids and checks what the reference itself
must satisfy: the output shape, finite logits and gradients, and agreement of
PyTorch's fused (eval + no_grad) and unfused (eval with grad) encoder paths
within the spec's fp32 tolerance. The fast-vs-reference equivalence report
builds on this once the fast variants exist.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from wmfast.build import build_model
from wmfast.config import ModelConfig

# The spec's fp32 logits tolerance (SPEC.md section 2).
LOGITS_RTOL = 1e-5
LOGITS_ATOL = 1e-5

# Small default models: every model class and positional type.
DEFAULT_SIZE = dict(d_vocab=64, d_model=64, n_heads=4, n_layers=2, d_mlp=128, dropout=0.0)


def default_configs(seed: int = 0) -> dict[str, ModelConfig]:
    """The built-in default models, by name."""
    configs = {}
    for pe in ("standard", "rotary", None, "rotary_qk"):
        configs[f"transformer/{pe}"] = ModelConfig(
            model_class="transformer", positional_embedding_type=pe, seed=seed, **DEFAULT_SIZE
        )
    for cls in ("rnn", "lstm"):
        configs[cls] = ModelConfig(
            model_class=cls,
            d_hidden=64,
            act_fn="tanh" if cls == "rnn" else "relu",
            seed=seed,
            **DEFAULT_SIZE,
        )
    return configs


@dataclasses.dataclass
class SmokeResult:
    name: str
    parameters: int
    logits_shape: tuple
    finite: bool
    fused_vs_unfused_max_abs: float
    fused_vs_unfused_close: bool
    grads_finite: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.finite and self.grads_finite and self.fused_vs_unfused_close


def smoke_check(
    config: ModelConfig, name: str, batch: int = 4, seq_len: int = 32, seed: int = 0
) -> SmokeResult:
    start = time.perf_counter()
    model = build_model(config, variant="reference")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.d_vocab, (batch, seq_len), generator=gen)
    model.eval()
    with torch.no_grad():
        fused = model(ids)  # may take PyTorch's fused encoder path
    logits = model(ids)  # with grad: the unfused path
    logits.float().square().mean().backward()
    grads_finite = all(
        p.grad is not None and bool(torch.isfinite(p.grad).all())
        for p in model.parameters()
        if p.requires_grad and p.numel() > 0
    )
    diff = (fused - logits.detach()).abs()
    allowed = LOGITS_ATOL + LOGITS_RTOL * logits.detach().abs()
    return SmokeResult(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        logits_shape=tuple(logits.shape),
        finite=bool(torch.isfinite(logits).all()),
        fused_vs_unfused_max_abs=float(diff.max()),
        fused_vs_unfused_close=bool((diff <= allowed).all()),
        grads_finite=grads_finite,
        seconds=time.perf_counter() - start,
    )


def run_default_checks(batch: int = 4, seq_len: int = 32, seed: int = 0) -> list[SmokeResult]:
    return [
        smoke_check(cfg, name, batch=batch, seq_len=seq_len, seed=seed)
        for name, cfg in default_configs(seed).items()
    ]
