"""Host work of an eager rotary_qk call, measured on a machine WITHOUT a GPU.

Where an eager op is host-bound (the SIR shape in bf16 on an H100: the
kernels take 0.57 ms a forward + backward, the call 0.72-0.83 ms), its time
is the host's: Python, autograd, allocation, the checks and Triton's launch
path. All of that runs on CPU tensors too, except the CUDA driver's launch,
so this tool times it here: a stand-in Triton driver answers the device
questions (an H100, sm_90), the kernel is compiled for sm_90 through ptxas
once, and the launcher is replaced by one that only reads each tensor's
pointer, as the real one does. The driver's own launch (cuLaunchKernelEx,
~18 us under the profiler on the H100) is not in these numbers.

Needs a triton with its NVIDIA backend (the GPU machine's: triton 3.6, in
the venv that tools/cuda_codegen_check.py describes)::

    env -u TRITON_INTERPRET /tmp/cu/bin/python tools/eager_host_cost.py

Prints microseconds per call (best of 5 rounds) and cProfile's top functions
of the forward + backward. Not a test; the numbers are this machine's.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET: the kernels must compile for sm_90")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 40, 0, 1024  # module, function, registers, spills, max threads


class _Launcher:
    """The launch without a device: reads each tensor's pointer, as triton's does."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                arg.data_ptr()


class _PretendH100:
    utils = _Utils()
    launcher_cls = _Launcher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(20):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls)
    return min(rounds) * 1e6


def main() -> None:
    driver.set_active(_PretendH100())
    import wmfast.kernels.rotary as K
    from wmfast import functional as WF

    K.check_device = lambda *tensors: None  # CPU tensors stand in for CUDA ones
    from wmfast.ops import rotary as ops

    batch, seq_len, heads, head_dim = 2, 8, 4, 128  # the host's work does not depend on size
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, dtype=torch.bfloat16)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    cos, sin = (t[None] for t in WF.rotary_tables(seq_len, WF.rotary_inv_freq(head_dim)))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    start = time.time()
    K.rotary_qk_launch(q, k, cos, sin, q_out, k_out)
    print(f"first launch (compiles for sm_90): {time.time() - start:.1f} s")

    print(
        f"rotary_qk_launch: {per_call_us(lambda: K.rotary_qk_launch(q, k, cos, sin, q_out, k_out)):.1f} us"
    )
    print(
        f"  check_rotary_qk alone: {per_call_us(lambda: K.check_rotary_qk(q, k, cos, sin)):.1f} us"
    )

    q_in, k_in = q.detach().requires_grad_(), k.detach().requires_grad_()
    g_q, g_k = torch.randn_like(q_out), torch.randn_like(k_out)

    def forward():
        ops.rotary_qk(q_in, k_in, cos, sin)

    def forward_backward():
        q_rot, k_rot = ops.rotary_qk(q_in, k_in, cos, sin)
        torch.autograd.backward((q_rot, k_rot), (g_q, g_k))
        q_in.grad = k_in.grad = None

    print(f"ops.rotary_qk forward (grad on): {per_call_us(forward):.1f} us")
    print(f"ops.rotary_qk forward + backward: {per_call_us(forward_backward):.1f} us")
    liger_host_cost(qkv, cos, sin)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2000):
        forward_backward()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def liger_host_cost(qkv, cos, sin) -> None:
    """The same host work for liger-kernel's RoPE, when it is installed: its
    launcher, and its autograd.Function forward + backward as
    bench_rotary.py's liger_autograd row runs it. It rotates in place, so it
    allocates nothing; ours allocates each output (four per forward + backward)."""
    try:
        from liger_kernel.ops import rope
    except ImportError:
        print("liger-kernel: not installed, skipped")
        return
    q = qkv[:, :, 0].contiguous().transpose(1, 2)  # its layout: (B, H, T, D) views
    k = qkv[:, :, 1].contiguous().transpose(1, 2)
    cos_full, sin_full = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    rope.rope_forward(q, k, cos_full, sin_full)  # compiles
    print(
        f"liger rope_forward: {per_call_us(lambda: rope.rope_forward(q, k, cos_full, sin_full)):.1f} us"
    )
    q_in, k_in = q.detach().requires_grad_(), k.detach().requires_grad_()
    d_q, d_k = torch.randn_like(q), torch.randn_like(k)

    def forward_backward():
        q_rot, k_rot = rope.LigerRopeFunction.apply(q_in, k_in, cos_full, sin_full)
        torch.autograd.grad((q_rot, k_rot), (q_in, k_in), (d_q, d_k))

    print(f"liger autograd forward + backward: {per_call_us(forward_backward):.1f} us")


if __name__ == "__main__":
    main()
