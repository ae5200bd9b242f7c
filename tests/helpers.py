"""Helpers shared by the tests: tolerances, seeded inputs, small configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from wmfast import ModelConfig

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"

# SPEC.md section 2: the one source of truth for tolerances
FP32_LOGITS = dict(rtol=1e-5, atol=1e-5)
FP32_GRADS = dict(rtol=1e-4, atol=1e-5)
# fp64 gradients of an op that only sums in another order than autograd's
FP64_GRADS = dict(rtol=1e-10, atol=1e-12)
AUTOCAST_LOGITS = dict(rtol=2e-2, atol=2e-2)

POSITIONAL_TYPES = ("standard", "rotary", None, "rotary_qk")


def random_ids(seed: int, d_vocab: int, batch: int, seq_len: int) -> torch.Tensor:
    """Token ids from a fresh seeded generator (never zeros, never the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (batch, seq_len), generator=gen)


def small_config(**changes) -> ModelConfig:
    base = dict(
        model_class="transformer",
        d_model=32,
        n_heads=4,
        n_layers=2,
        d_mlp=48,
        d_vocab=50,
        d_hidden=24,
        n_ctx=64,
        dropout=0.0,
        seed=0,
    )
    base.update(changes)
    return ModelConfig(**base)


# Output-storage tolerances for kernel results against an fp64 reference: the
# math is fp32 either way, so only the final rounding to storage differs.
STORAGE_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def rotate_pairs_fp64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The pair rotation in fp64, independent of wmfast's code."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    c, s = cos.double(), sin.double()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def kernel_device() -> torch.device:
    """Where kernel tests run: CUDA when present, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference_model(config: ModelConfig) -> torch.nn.Module:
    """The reference variant (build_model's default is the fast one)."""
    from wmfast import build_model

    return build_model(config, variant="reference")


def errors_against_fp64(reference, fast, ids, weight_seed: int = 7) -> dict[str, tuple]:
    """How far the fp32 ``reference`` and ``fast`` each are from the reference
    run in fp64, on the logits and on every parameter gradient of
    ``(logits * weight).sum()``: ``{name: (reference_error, fast_error, scale)}``,
    errors as max abs differences, ``scale`` the fp64 value's max abs.

    Where fast sums in another order than the reference (CUDA's fused norms,
    Inductor's reductions), fast vs reference compares two roundings of the
    same sums; against fp64, each is measured on its own (flash-attention's
    tests judge their kernels the same way)."""
    exact = copy.deepcopy(reference).double()
    ids = ids.to(next(reference.parameters()).device)
    out = {}
    for name, model in (("reference", reference), ("fast", fast), ("fp64", exact)):
        logits = model(ids)
        gen = torch.Generator().manual_seed(weight_seed)
        weight = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((logits * weight.to(logits)).sum(), params)
        out[name] = [logits.detach(), *grads]
    names = ["logits"] + [n for n, p in reference.named_parameters() if p.requires_grad]
    errors = {}
    for i, name in enumerate(names):
        want = out["fp64"][i]
        ref_err, fast_err = (
            (out[k][i].double() - want).abs().max().item() for k in ("reference", "fast")
        )
        errors[name] = (ref_err, fast_err, want.abs().max().item())
    return errors


def assert_as_close_to_fp64_as_the_reference(reference, fast, ids, factor: float = 2.0):
    """fast's error against fp64 is at most ``factor`` times the fp32
    reference's own, on the logits and every parameter gradient (plus 1e-6 of
    the value's scale, for values the fp32 reference happens to get exact)."""
    errors = errors_against_fp64(reference, fast, ids)
    worse = {
        name: f"fast {fast_err:.2e}, reference {ref_err:.2e}, scale {scale:.2e}"
        for name, (ref_err, fast_err, scale) in errors.items()
        if fast_err > factor * ref_err + 1e-6 * scale
    }
    assert not worse, f"further from fp64 than {factor}x the fp32 reference: {worse}"


def assert_low_precision_grads_near_exact(names, ours, torchs, exact) -> None:
    """Low-precision gradients (each a sum over positions whose terms cancel)
    judged against exact arithmetic on the same inputs, beside PyTorch's own
    low-precision composition: ours at most twice its error, plus a bf16
    step of the value's scale."""
    for name, got, theirs, truth in zip(names, ours, torchs, exact, strict=True):
        assert got.dtype == theirs.dtype, name
        ours_err = float((got.double() - truth).abs().max())
        torch_err = float((theirs.double() - truth).abs().max())
        step = 2**-8 * float(truth.abs().max())
        assert ours_err <= 2 * torch_err + step, (name, ours_err, torch_err)


def count_applies(monkeypatch, function: type[torch.autograd.Function]) -> list[int]:
    """A one-element list counting the calls of ``function.apply`` from now on
    (until ``monkeypatch`` undoes the wrapping)."""
    calls = [0]
    apply = function.apply

    def counting_apply(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(function, "apply", counting_apply)
    return calls


def reference_and_fast(config: ModelConfig, device="cpu", **options):
    """A reference model on ``device`` and the fast variant sharing its
    parameters (``make_fast``'s keywords in ``options``)."""
    from wmfast.fast import make_fast

    reference = reference_model(config).to(device)
    return reference, make_fast(reference, **options)


# Devices the fast-vs-reference property tests run on: the CPU always, CUDA too
# when present (so a GPU machine runs the same suite on the CUDA fast path).
# The CUDA cases carry the cuda marker, so `-m cuda` (bench/gpu_session.sh's
# cudatests) selects them with the tests that only run on CUDA.
DEVICES = ["cpu"] + (
    [pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else []
)


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """A pass-through tensor mode that records the ops it sees: under a mode
    the Triton ops take their registered torch.library path
    (wmfast.ops._eager), which this both forces and shows."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def assert_registered_ops_compute_the_same(run, op_names: tuple[str, ...]) -> None:
    """``run()`` -> (outputs, grads): eagerly (the autograd.Function path) and under
    RecordOps (the registered ops, each of ``op_names`` seen), bit for bit."""
    eager_outputs, eager_grads = run()
    with RecordOps() as mode:
        op_outputs, op_grads = run()
    # the CPU registers opaque ops, CUDA triton_ops named *_traceable
    seen = {n.removesuffix(".default").removesuffix("_traceable") for n in mode.names}
    for op_name in op_names:
        assert op_name in seen, (op_name, mode.names)
    for got, want in zip(op_outputs + op_grads, eager_outputs + eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class HalvedForward:
    """A forward to set on a module instance, as a monkeypatched ablation
    writes one: the class's forward with every output tensor halved. A class
    rather than a closure, so that models holding one still deep-copy (bound
    to the copy) and pickle."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        out = type(self.module).forward(self.module, *args, **kwargs)
        return torch.utils._pytree.tree_map(lambda t: t * 0.5, out)


def put_relu_inputs_at_zero(model, input_ids, where) -> None:
    """Shift linear1's bias in layer 0 so that its outputs at ``where`` (a list
    of (b, t, unit), distinct units) are zero up to rounding: ReLU kinks
    (wmfast.relu_kinks) at known places, for a model in train mode."""
    linear1 = model.transformer_encoder.layers[0].linear1
    seen = []
    handle = linear1.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        model(input_ids)
    handle.remove()
    with torch.no_grad():
        for index in where:
            linear1.bias[index[-1]] -= seen[0][index]


def grads_across_relu_kinks(reference, run, got, want, tolerance) -> list:
    """The reference gradients to hold ``got`` to: ``want`` (``run()``'s
    result: the reference's gradients, a list in parameter order), or, where
    ``got`` differs from it beyond ``tolerance`` and the reference has ReLU
    inputs within 1e-5 (relative) of zero, its gradients with the flips that
    explain the gap (wmfast.relu_kinks, as `wmfast check` judges). At such an
    input the gradient is the derivative of either side, and a fast path
    that rounds differently may take the other: drawn inputs hit one now and
    then (the "gpu" profile found one 6e-8 from zero). A wrong gradient is
    not a sum of a few flips' effects and still fails the caller's check."""
    from wmfast import relu_kinks

    def close(a, b):
        return a is None or b is None or torch.allclose(a, b, **tolerance)

    failing = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if not close(g, w)]
    if not failing:
        return want
    found = relu_kinks.explain_gap(
        reference, run, lambda: dict(enumerate(run())),
        dict(enumerate(want)), dict(enumerate(got)), failing, 1e-5,
    )  # fmt: skip
    return list(found.grads.values()) if found.flips else want


def grad_at(nm, path: str, ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """In an nnsight trace of ``nm``: the gradient of ``(logits * weight).sum()``
    (``weight`` 1 if None) at the output of ``path`` (its first tensor, for
    tuples), as a researcher reads it with ``.grad``."""
    from wmfast.check import envoy_at

    with nm.trace(ids):
        out = envoy_at(nm, path).output
        target = out[0] if isinstance(out, tuple) else out
        logits = nm.output
        with (logits.sum() if weight is None else (logits * weight).sum()).backward():
            grad = target.grad.save()
    return grad
