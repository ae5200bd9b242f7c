"""The "rotary" model's gradients per way of running its embedding rotation, on a GPU.

    python tools/rotary_grad_probe.py            # TORCH_LOGS=output_code for the code

`wmfast check --device cuda` (H100, torch 2.11, triton 3.6) once found the
"rotary" model's gradients off with the Triton embedding rotation: logits
and layer 1 exact, the embedding's and layer 0's attention, linear1 and norm1
gradients up to 0.14 off. It was a ReLU kink, not a wrong kernel: for the
check's inputs one ReLU input in layer 0 is 2.2e-8 from zero, so 1-ulp
changes of the rotation's output flip it (bench/results/README.md, "h100-3").
This probe compares the gradients of one backward of the sum-weighted loss
(wmfast check's) with the reference's, for each way the rotation can run:

  eager torch      compile="never": the uncompiled fast path, torch math
  eager triton     compile="never": the Triton op outside any graph
  compiled torch   Inductor's code for the torch math (the rule's choice)
  compiled triton  the triton_op (wrap_triton) inside the compiled graph
  compiled opaque  the opaque custom op (as on CPU) inside the compiled graph
  check's order    compiled triton after a no-grad call, in eval then train

and prints, per way, the largest gap, its size relative to that gradient's
largest value, and the parameters past SPEC's fp32 gradient tolerance; first,
the ReLU input in layer 0 nearest zero, and ``--seed`` picks the token ids
(seed 0: the check's, with the kink; 11: the CUDA test's, without). At this
loss scale a compiled path's other order of sums alone can pass SPEC's
tolerance (on CPU: gaps of ~1e-6 relative); a kink shows as ~0.1 on linear1.
It is not a test.
"""

from __future__ import annotations

import argparse

import torch

from wmfast import build_model, make_fast
from wmfast.check import DEFAULT_BATCH, DEFAULT_SEQ_LEN, default_configs
from wmfast.ops import rotary as rotary_ops

RTOL, ATOL = 1e-4, 1e-5  # SPEC's fp32 gradient tolerance


def grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * weight.to(logits.device)).sum().backward()  # as wmfast check weighs them
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def report(way: str, got: dict, want: dict) -> None:
    gaps = {name: (got[name] - want[name]).abs().max().item() for name in want}
    off = [name for name in want if not torch.allclose(got[name], want[name], rtol=RTOL, atol=ATOL)]
    worst = max(gaps, key=gaps.get)
    relative = gaps[worst] / max(want[worst].abs().max().item(), 1e-30)
    print(
        f"{way:22s} largest gap {gaps[worst]:.2e} ({worst}, {relative:.1e} of its largest"
        f" value); off: {off or 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the token ids' seed")
    config = default_configs()["transformer/rotary"]
    reference = build_model(config, variant="reference").cuda()
    gen = torch.Generator().manual_seed(parser.parse_args().seed)
    ids = torch.randint(0, config.d_vocab, (DEFAULT_BATCH, DEFAULT_SEQ_LEN), generator=gen).cuda()
    nearest = []
    hook = reference.transformer_encoder.layers[0].linear1.register_forward_hook(
        lambda module, args, out: nearest.append(out.abs().min().item())
    )
    want = grads(reference, ids)
    hook.remove()
    print(f"layer 0's ReLU input nearest zero: {nearest[0]:.1e}")
    traceable = rotary_ops._embedding_rotation_traceable
    opaque = rotary_ops._embedding_rotation_opaque
    ways = {
        "eager torch": (dict(compile="never", rotary="torch"), traceable),
        "eager triton": (dict(compile="never", rotary="triton"), traceable),
        "compiled torch": (dict(compile="always", rotary="torch"), traceable),
        "compiled triton": (dict(compile="always", rotary="triton"), traceable),
        "compiled opaque": (dict(compile="always", rotary="triton"), opaque),
    }
    for way, (options, op) in ways.items():
        torch._dynamo.reset()
        rotary_ops._embedding_rotation_traceable = op
        try:
            report(way, grads(make_fast(reference, **options), ids), want)
        finally:
            rotary_ops._embedding_rotation_traceable = traceable
    torch._dynamo.reset()
    fast = make_fast(reference, compile="always", rotary="triton").eval()
    with torch.no_grad():
        fast(ids)
    for train in (False, True):
        reference.train(train)
        want = grads(reference, ids)
        report(
            f"check's order, {'train' if train else 'eval'}", grads(fast.train(train), ids), want
        )


if __name__ == "__main__":
    main()
