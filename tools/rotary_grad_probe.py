"""Which fast path gives the "rotary" model wrong gradients on CUDA, on a GPU.

    python tools/rotary_grad_probe.py            # TORCH_LOGS=output_code for the code

`wmfast check --device cuda` (H100, torch 2.11, triton 3.6) found the "rotary"
(embedding rotation) model's compiled training step off: logits and every
later layer exact, layer 0's and the embedding's gradients off by up to 0.14.
wmfast.backends.COMPILED_TRAINING_EMBEDDING_ROTATION now keeps that step on
the torch math. This probe sets it back and compares the gradients of one
backward with the reference's for each way the rotation can run:

  eager triton     compile="never": the Triton op outside any graph
  compiled torch   the rule as shipped: Inductor's code for the torch math
  compiled triton  the triton_op (wrap_triton) inside the compiled graph
  compiled opaque  the opaque custom op (as on CPU) inside the compiled graph

and prints, per way, the largest gap and the parameters past the fp32
gradient tolerance. It is not a test.
"""

from __future__ import annotations

import torch

from wmfast import backends, build_model, make_fast
from wmfast.check import DEFAULT_BATCH, DEFAULT_SEQ_LEN, default_configs
from wmfast.ops import rotary as rotary_ops

RTOL, ATOL = 1e-4, 1e-5  # SPEC's fp32 gradient tolerance


def grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * weight.to(logits.device)).mean().backward()  # the check's scale of gradients
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def main() -> None:
    config = default_configs()["transformer/rotary"]
    reference = build_model(config).cuda()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.d_vocab, (DEFAULT_BATCH, DEFAULT_SEQ_LEN), generator=gen).cuda()
    want = grads(reference, ids)
    traceable = rotary_ops._embedding_rotation_traceable
    ways = {
        "eager triton": (dict(compile="never", rotary="triton"), "torch", traceable),
        "compiled torch": (dict(compile="always", rotary="torch"), "torch", traceable),
        "compiled triton": (dict(compile="always", rotary="triton"), "triton", traceable),
        "compiled opaque": (
            dict(compile="always", rotary="triton"),
            "triton",
            rotary_ops._embedding_rotation_opaque,
        ),
    }
    for way, (options, rule, op) in ways.items():
        torch._dynamo.reset()
        backends.COMPILED_TRAINING_EMBEDDING_ROTATION = rule
        rotary_ops._embedding_rotation_traceable = op
        try:
            got = grads(make_fast(reference, **options), ids)
        finally:
            rotary_ops._embedding_rotation_traceable = traceable
        gaps = {name: (got[name] - want[name]).abs().max().item() for name in want}
        off = [
            name for name in want if not torch.allclose(got[name], want[name], rtol=RTOL, atol=ATOL)
        ]
        worst = max(gaps, key=gaps.get)
        print(f"{way:16s} largest gap {gaps[worst]:.2e} ({worst}); off: {off or 'none'}")


if __name__ == "__main__":
    main()
