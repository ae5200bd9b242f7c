"""Rotary kernels against their peers: the pure-torch eager reference, the same
math under torch.compile (Inductor's generated kernel), and liger-kernel's RoPE.

Groups: ``rotary_qk/{fwd,fwdbwd}/{shape}/{dtype}`` and
``embedding_rotation/{fwd,fwdbwd}/{shape}/{dtype}``; ``gb_per_s`` in extra_info
counts the bytes each call must move (read q, k; write q', k'; backward the
same again), tables excluded (they are (T, D/2) and stay in cache). The
yardstick is ``copy/{shape}/{dtype}``: the device's copy bandwidth on the
bytes of q and k at the large shape, measured in the same run (the kernels'
target: rotary_qk forward+backward at >= 80% of it; bench/report.py notes
each kernel's share).

Run on a GPU:  pytest bench/bench_rotary.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from wmfast import functional as WF

from .timing import kernel_calls_per_round, time_it

pytestmark = pytest.mark.triton

# name: (batch, seq_len, heads, head_dim) for rotary_qk
QK_SHAPES_CUDA = {
    "sir_d128": (256, 800, 4, 128),  # SIR task, d_model 512
    "sir_d64": (256, 800, 4, 64),  # SIR task, d_model 256
    "large": (8, 4096, 32, 128),  # bandwidth-bound
}
QK_SHAPES_CPU = {"tiny": (2, 8, 2, 16)}
QK_CASES_CUDA = [(s, torch.bfloat16) for s in QK_SHAPES_CUDA] + [("sir_d128", torch.float32)]
QK_CASES_CPU = [("tiny", torch.float32)]

# name: (batch, seq_len, d_model) for the embedding rotation
EMB_SHAPES_CUDA = {"sir_d512": (256, 800, 512), "sir_d256": (256, 800, 256)}
EMB_SHAPES_CPU = {"tiny": (2, 8, 32)}
EMB_CASES_CUDA = [(s, dt) for s in EMB_SHAPES_CUDA for dt in (torch.bfloat16, torch.float32)]
EMB_CASES_CPU = [("tiny", torch.float32)]

QK_IMPLS = [
    "torch_eager",
    "torch_compile",
    "wmfast_triton",
    "wmfast_triton_inplace",
    "wmfast_launchers",
    "liger",
    "liger_autograd",
]
EMB_IMPLS = ["torch_eager", "torch_compile", "wmfast_triton"]


def _cases(cuda_cases, cpu_cases):
    on_cuda = torch.cuda.is_available()
    return [
        pytest.param(shape, dtype, id=f"{shape}-{str(dtype).split('.')[-1]}")
        for shape, dtype in (cuda_cases if on_cuda else cpu_cases)
    ]


@pytest.fixture(scope="module")
def ops():
    from wmfast.ops import rotary

    return rotary


COPY_CASES_CUDA = [("large", torch.bfloat16)]


@pytest.mark.parametrize("shape, dtype", _cases(COPY_CASES_CUDA, QK_CASES_CPU))
def bench_copy(benchmark, device, shape, dtype):
    """``dst.copy_(src)`` over as many bytes as q and k at ``shape``: what moving
    those bytes costs at the best rate the device sustains."""
    numel = 2 * torch.Size({**QK_SHAPES_CUDA, **QK_SHAPES_CPU}[shape]).numel()  # q and k
    benchmark.group = f"copy/{shape}/{str(dtype).split('.')[-1]}"
    src = torch.empty(numel, device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    time_it(
        benchmark,
        lambda: dst.copy_(src),
        device,
        calls=kernel_calls_per_round(device, numel),
        bytes_per_call=2 * numel * src.element_size(),  # read once, write once
        shape=[numel],
        dtype=str(dtype),
        impl="copy",
    )


@pytest.fixture(scope="module")
def compiled_rotary_qk():
    return torch.compile(WF.rotary_qk, dynamic=False)


@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", QK_IMPLS)
@pytest.mark.parametrize("shape, dtype", _cases(QK_CASES_CUDA, QK_CASES_CPU))
def bench_rotary_qk(benchmark, device, ops, compiled_rotary_qk, shape, dtype, impl, direction):
    batch, seq_len, heads, head_dim = {**QK_SHAPES_CUDA, **QK_SHAPES_CPU}[shape]
    if impl == "wmfast_triton_inplace" and direction == "fwdbwd":
        pytest.skip("the in-place variant has no backward (inference only)")
    benchmark.group = f"rotary_qk/{direction}/{shape}/{str(dtype).split('.')[-1]}"
    gen = torch.Generator().manual_seed(0)
    grad = direction == "fwdbwd"
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(device, dtype)
    # q and k are leaves viewing the packed projection: backward times the op's
    # own backward, not autograd scattering d_q and d_k into a packed gradient
    q_in, k_in = (qkv[:, :, i].requires_grad_(grad) for i in (0, 1))
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(head_dim).to(device))
    cos, sin = cos[None], sin[None]  # (1, T, D/2): one table for the whole batch
    g_q = torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device, dtype)
    g_k = g_q.flip(0)

    if impl == "liger":
        fn = _liger_rotary_qk(qkv, cos, sin, g_q, g_k, direction)
    elif impl == "liger_autograd":
        fn = _liger_autograd_rotary_qk(qkv, cos, sin, g_q, g_k, grad)
    elif impl == "wmfast_launchers":
        fn = _launchers_rotary_qk(q_in, k_in, cos, sin, g_q, g_k, direction)
    elif impl == "wmfast_triton_inplace":
        buffer = qkv.detach().clone()

        def fn():
            ops.rotary_qk_packed_(buffer, cos, sin)  # rotates the same buffer every call

    else:
        rotate = {
            "torch_eager": WF.rotary_qk,
            "torch_compile": compiled_rotary_qk,
            "wmfast_triton": ops.rotary_qk,
        }[impl]

        def fn():
            q, k = rotate(q_in, k_in, cos, sin)
            if grad:
                torch.autograd.backward((q, k), (g_q, g_k))
                q_in.grad = k_in.grad = None

    numel = batch * seq_len * heads * head_dim
    moved = 4 * numel * qkv.element_size() * (2 if grad else 1)
    with torch.set_grad_enabled(grad):
        time_it(
            benchmark,
            fn,
            device,
            calls=kernel_calls_per_round(device, numel),
            bytes_per_call=moved,
            shape=[batch, seq_len, heads, head_dim],
            dtype=str(dtype),
            impl=impl,
            direction=direction,
        )


PACKED_IMPLS = ["torch_compile", "wmfast_triton", "wmfast_triton_packed"]


@pytest.fixture(scope="module")
def compiled_split_and_rotate():
    return torch.compile(_split_and_rotate, dynamic=False)


def _split_and_rotate(qkv, cos, sin):
    """What attention takes from the packed projection: q and k rotated, v."""
    q, k, v = qkv.unbind(2)
    return (*WF.rotary_qk(q, k, cos, sin), v)


@pytest.mark.parametrize("impl", PACKED_IMPLS)
@pytest.mark.parametrize("shape, dtype", _cases(QK_CASES_CUDA, QK_CASES_CPU))
def bench_rotary_qk_packed(benchmark, device, ops, compiled_split_and_rotate, shape, dtype, impl):
    """Forward and backward from the packed projection (B, T, 3, H, D) as the
    model runs it: its gradient is one packed tensor. rotary_qk's backward
    writes q's and k's gradients and autograd stacks them with v's;
    rotary_qkv_packed's writes the packed gradient itself; Inductor fuses
    the rotation back into its stack."""
    batch, seq_len, heads, head_dim = {**QK_SHAPES_CUDA, **QK_SHAPES_CPU}[shape]
    benchmark.group = f"rotary_qk_packed/fwdbwd/{shape}/{str(dtype).split('.')[-1]}"
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(device, dtype)
    qkv.requires_grad_()
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(head_dim).to(device))
    cos, sin = cos[None], sin[None]
    grads = [torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device, dtype)]
    grads += [grads[0].flip(0), grads[0].flip(1)]

    split = {
        "torch_compile": compiled_split_and_rotate,
        "wmfast_triton": lambda qkv, cos, sin: (
            *ops.rotary_qk(qkv[:, :, 0], qkv[:, :, 1], cos, sin),
            qkv[:, :, 2],
        ),
        "wmfast_triton_packed": ops.rotary_qkv_packed,
    }[impl]

    def fn():
        torch.autograd.backward(split(qkv, cos, sin), grads)
        qkv.grad = None

    numel = batch * seq_len * heads * head_dim
    # forward: read q, k; write them rotated. backward: read 3 gradients, write the packed one
    moved = (4 + 6) * numel * qkv.element_size()
    time_it(
        benchmark,
        fn,
        device,
        calls=kernel_calls_per_round(device, numel),
        bytes_per_call=moved,
        shape=[batch, seq_len, heads, head_dim],
        dtype=str(dtype),
        impl=impl,
        direction="fwdbwd",
    )


def _liger_inputs(qkv, cos, sin, g_q, g_k):
    """liger's rope module and its preferred layout: q, k, d_q, d_k as
    (B, H, T, D) views of contiguous (B, T, H, D) storage, and duplicated
    (1, T, D) tables. Skips where liger cannot run."""
    if not torch.cuda.is_available():
        pytest.skip("liger-kernel runs on CUDA only")
    rope = pytest.importorskip("liger_kernel.ops.rope")
    q = qkv[:, :, 0].contiguous().transpose(1, 2)
    k = qkv[:, :, 1].contiguous().transpose(1, 2)
    cos_full, sin_full = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    dq, dk = g_q.transpose(1, 2).clone(), g_k.transpose(1, 2).clone()
    return rope, q, k, cos_full, sin_full, dq, dk


def _liger_rotary_qk(qkv, cos, sin, g_q, g_k, direction):
    """liger's RoPE on its preferred layout, in place. fwdbwd calls its
    forward and backward launchers directly (it rotates in place, so autograd
    on a reused leaf is not an option)."""
    rope, q, k, cos_full, sin_full, dq, dk = _liger_inputs(qkv, cos, sin, g_q, g_k)

    def fn():
        rope.rope_forward(q, k, cos_full, sin_full)
        if direction == "fwdbwd":
            rope.rope_backward(dq, dk, cos_full, sin_full)

    return fn


def _liger_autograd_rotary_qk(qkv, cos, sin, g_q, g_k, grad):
    """liger's RoPE as a user calls it: its autograd.Function on leaves, so
    that the row compares with wmfast_triton (our op through autograd) as
    liger's row compares with wmfast_launchers. Its forward rotates the
    leaves' storage in place and its backward the gradients (rotations: the
    values stay bounded call after call). torch.autograd.grad hands its
    gradients back as they are; .backward() into the leaves' .grad would copy
    them, since the benchmark holds them too (wmfast's come new and are
    taken as they are)."""
    rope, q_in, k_in, cos_full, sin_full, dq, dk = _liger_inputs(qkv, cos, sin, g_q, g_k)
    q_in.requires_grad_(grad), k_in.requires_grad_(grad)

    def fn():
        q, k = rope.LigerRopeFunction.apply(q_in, k_in, cos_full, sin_full)
        if grad:
            torch.autograd.grad((q, k), (q_in, k_in), (dq, dk))

    return fn


def _launchers_rotary_qk(q, k, cos, sin, g_q, g_k, direction):
    """wmfast's kernels as liger's row runs its own: the forward and backward
    launchers on preallocated outputs, no autograd and no allocation. Beside
    the op through autograd (wmfast_triton) it tells the kernels' time from
    the op's host work where a call is host-bound."""
    from wmfast.kernels.rotary import rotary_qk_launch

    q_out, k_out, d_q, d_k = (torch.empty_like(t) for t in (g_q, g_k, g_q, g_k))

    def fn():
        rotary_qk_launch(q, k, cos, sin, q_out, k_out)
        if direction == "fwdbwd":
            rotary_qk_launch(g_q, g_k, cos, sin, d_q, d_k, conj=True)

    return fn


@pytest.fixture(scope="module")
def compiled_embedding_rotation():
    return torch.compile(_embedding_rotation_eager, dynamic=False)


def _embedding_rotation_eager(emb, inv_freq, scale):
    """The reference model's steps: scale, then x + pos_encoder(x)."""
    x = emb * scale
    return x + WF.embedding_rotation(x, inv_freq)


@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", EMB_IMPLS)
@pytest.mark.parametrize("shape, dtype", _cases(EMB_CASES_CUDA, EMB_CASES_CPU))
def bench_embedding_rotation(
    benchmark, device, ops, compiled_embedding_rotation, shape, dtype, impl, direction
):
    batch, seq_len, d_model = {**EMB_SHAPES_CUDA, **EMB_SHAPES_CPU}[shape]
    benchmark.group = f"embedding_rotation/{direction}/{shape}/{str(dtype).split('.')[-1]}"
    gen = torch.Generator().manual_seed(0)
    grad = direction == "fwdbwd"
    emb = torch.randn(batch, seq_len, d_model, generator=gen).to(device, dtype).requires_grad_(grad)
    inv_freq = WF.rotary_inv_freq(d_model).to(device)
    g = torch.randn(batch, seq_len, d_model, generator=gen).to(device, dtype)
    scale = d_model**0.5

    def forward():
        if impl == "wmfast_triton":  # the fast model's steps: tables, then one fused kernel
            cos, sin = WF.rotary_tables(seq_len, inv_freq)
            return ops.embedding_rotation(emb, cos, sin, scale=scale)
        rotate = _embedding_rotation_eager if impl == "torch_eager" else compiled_embedding_rotation
        return rotate(emb, inv_freq, scale)

    def fn():
        out = forward()
        if grad:
            out.backward(g)
            emb.grad = None

    numel = batch * seq_len * d_model
    with torch.set_grad_enabled(grad):
        time_it(
            benchmark,
            fn,
            device,
            calls=kernel_calls_per_round(device, numel),
            bytes_per_call=2 * numel * emb.element_size() * (2 if grad else 1),
            shape=[batch, seq_len, d_model],
            dtype=str(dtype),
            impl=impl,
            direction=direction,
        )
