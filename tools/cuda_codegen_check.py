"""Compile the fast transformer's CUDA forward on a machine WITHOUT a GPU.

What it checks: that torch.compile (Dynamo -> AOTAutograd -> Inductor) turns
wmfast's untraced forward with the Triton rotary ops (``torch.library.triton_op``)
into CUDA code, and that Triton and ptxas compile every kernel of that code for
an H100 (sm_90): ours and Inductor's. Nothing runs: each case stops with a CUDA
error when the compiled code is first called, which is the expected end.

What it cannot check: numbers, speed, CUDA graphs at run time, the training
step (AOTAutograd traces the backward with the autograd engine, which needs a
device). For those, run ``bench/gpu_session.sh`` on a GPU. The add & norm
backward ops are compiled on their own instead, with their rows dynamic, to
check that one graph serves every row count (a last case, ``--backward-ops``).

Needs a CUDA build of torch and triton (the GPU machine's: torch 2.11+cu130,
triton 3.6; a CPU build of torch aborts on the first CUDA op even on fake
tensors)::

    python3.12 -m venv /tmp/cu && /tmp/cu/bin/pip install torch==2.11.0 pytest
    /tmp/cu/bin/pip install --no-deps -e . && /tmp/cu/bin/python tools/cuda_codegen_check.py

How: parameters and inputs are FakeTensors on device "cuda" (shapes only), and
``pretend_h100`` answers the device questions torch and triton ask at compile
time. It patches private APIs of that torch version: when a patch stops
applying, it fails loudly rather than pass. Each case runs in a new process
(Dynamo's caches and the patches are process-wide), ~20-60 s each on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import types

# (positional type, dynamic, dtype, torch.compile mode, d_model, n_heads, d_mlp, norm)
CASES = [
    ("rotary_qk", "none", "bf16", "default", 64, 2, 128, "torch"),
    (
        "rotary_qk",
        "true",
        "fp32",
        "default",
        96,
        2,
        128,
        "torch",
    ),  # head dim 48: not a power of two
    ("rotary_qk", "true", "bf16", "reduce-overhead", 64, 2, 128, "torch"),
    (
        "rotary_qk",
        "none",
        "bf16",
        "default",
        512,
        4,
        0,
        "torch",
    ),  # the SIR model: d_mlp 0, head dim 128
    ("rotary", "true", "bf16", "default", 64, 2, 128, "torch"),
    ("rotary", "none", "fp32", "reduce-overhead", 48, 2, 0, "torch"),
    ("standard", "true", "bf16", "default", 64, 2, 128, "torch"),
    ("None", "true", "fp32", "default", 64, 2, 128, "torch"),
    # norm="triton" runs in train mode (still no grad): dropout's mask code compiles too
    ("rotary_qk", "none", "bf16", "default", 512, 4, 0, "triton"),
    ("standard", "true", "fp32", "reduce-overhead", 64, 2, 128, "triton"),
]
# name prefixes of wmfast's kernels (the rest are Inductor's)
OUR_KERNELS = ("_rotary", "_embedding", "_dropout", "_bias_ffn")
SEQ_LENS = (16, 17, 33, 1)  # 16: Triton's divisible-by-16 case; 1: its own graph
H100 = types.SimpleNamespace(
    name="NVIDIA H100 (pretend)",
    major=9,
    minor=0,
    multi_processor_count=132,
    total_memory=80 * 2**30,
    regs_per_multiprocessor=65536,
    max_threads_per_multi_processor=2048,
    max_threads_per_block=1024,
    warp_size=32,
    L2_cache_size=50 * 2**20,
    shared_memory_per_block_optin=227 * 1024,
    shared_memory_per_multiprocessor=228 * 1024,
    gcnArchName="",
    is_integrated=False,
)


def pretend_h100(compiled_kernels: list[str]) -> None:
    """Answer compile-time device queries as an H100 would; record each Triton
    kernel that compiled (to a cubin) instead of loading it onto a device."""
    import torch
    import torch._inductor.config as inductor_config
    import torch._inductor.fx_passes.fuse_attention as fuse_attention
    import triton
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher

    def answer(value):
        return lambda *args, **kwargs: value

    for name, value in (
        ("is_available", True),
        ("device_count", 1),
        ("current_device", 0),
        ("set_device", None),
        ("synchronize", None),
        ("get_device_properties", H100),
    ):
        setattr(torch.cuda, name, answer(value))
        setattr(CudaInterface, name, staticmethod(answer(value)))  # Inductor asks here
    torch.cuda.is_initialized = answer(True)
    torch.cuda._lazy_init = answer(None)
    torch.cuda.get_device_capability = answer((9, 0))
    torch.cuda.get_device_name = answer(H100.name)
    # Dynamo saves and restores the CUDA RNG state around tracing
    torch.cuda.get_rng_state = answer(torch.zeros(16, dtype=torch.uint8))
    torch.cuda.set_rng_state = answer(None)
    torch.cuda.device.__enter__ = answer(None)
    torch.cuda.device.__exit__ = answer(False)
    CudaInterface.get_raw_stream = staticmethod(answer(0))
    CudaInterface.exchange_device = staticmethod(answer(0))
    CudaInterface.maybe_exchange_device = staticmethod(answer(0))
    # these passes build or benchmark real CUDA tensors
    fuse_attention._sfdp_init = answer(None)
    inductor_config.shape_padding = False

    class TargetOnlyDriver(CudaDriver):
        """Triton's CUDA driver minus libcuda: enough to pick sm_90 and compile."""

        def __init__(self) -> None:
            self.utils = None
            self.launcher_cls = CudaLauncher
            self.get_device_capability = answer((9, 0))
            self.get_current_stream = answer(0)
            self.get_current_device = answer(0)
            self.set_current_device = answer(None)

    triton.runtime.driver.set_active(TargetOnlyDriver())

    def record_instead_of_loading(self) -> None:
        compiled_kernels.append(self.fn.__name__)

    CachingAutotuner._make_launchers = record_instead_of_loading
    CachingAutotuner._dynamic_scale_rblock = answer(None)


def run_case(positional, dynamic, dtype, mode, d_model, n_heads, d_mlp, norm) -> bool:
    """One case in this process; prints a line per sequence length."""
    import torch
    from torch._dynamo.utils import counters
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wmfast import ModelConfig, build_model
    from wmfast.attention_backends import CAUSAL_ATTENTION
    from wmfast.fast import FastOptions

    def sdpa_as_on_h100(q, k, v, dropout_p):
        # SDPA picks its kernel by asking the device, which is not there: call
        # the one an H100 picks (flash for bf16, memory-efficient for fp32)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if dtype == "bf16":
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, True)
        else:
            out = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, False, dropout_p, True
            )
        return out[0].transpose(1, 2)

    CAUSAL_ATTENTION["sdpa"] = sdpa_as_on_h100
    config = ModelConfig(
        d_model=d_model,
        n_heads=n_heads,
        d_vocab=350,
        d_mlp=d_mlp,
        positional_embedding_type=None if positional == "None" else positional,
    )
    # the fast model as users build it; its root forward -> FastRunner -> the
    # compiled transformer_forward with the Triton rotary ops (the CUDA rules)
    model = build_model(
        config,
        fast_options=FastOptions(
            dynamic={"none": None, "true": True}[dynamic],
            mode=None if mode == "default" else mode,
            norm=norm,
        ),
    ).train(norm == "triton")
    model.check_token_ids = False  # a data-dependent check: fake tensors hold no data
    compiled_kernels: list[str] = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        # fake CUDA tensors must exist before the device queries are answered
        model = model.to("cuda")
        ids = {t: torch.zeros((4, t), dtype=torch.long, device="cuda") for t in SEQ_LENS}
        pretend_h100(compiled_kernels)
        ok = True
        for seq_len in SEQ_LENS:
            before = len(compiled_kernels)
            try:
                with (
                    torch.no_grad(),
                    torch.autocast("cuda", torch.bfloat16, enabled=dtype == "bf16"),
                ):
                    model(ids[seq_len])
                result = "ran: this machine has a GPU, use the GPU tests instead"
                ok = False
            except torch.AcceleratorError:  # the compiled code's first device call: expected
                new = compiled_kernels[before:]
                ours = sorted({k for k in new if k.startswith(OUR_KERNELS)})
                result = f"compiled ({len(new)} new Triton kernels, ours: {ours}); stopped at run"
            except Exception as e:
                result = f"FAILED: {type(e).__name__}: {str(e)[:2000]}"
                ok = False
            print(f"  T={seq_len:<3} {result}", flush=True)
            if not ok:
                break
        print(
            f"  graphs compiled: {counters['stats']['unique_graphs']}; plan: {model._fast.last_plan}"
        )
    return ok


# rows (batch x length) the backward ops are compiled at: both sides of the
# programs an H100 keeps resident (4224 and 2112), up to the SIR step's rows
BACKWARD_ROWS = (3, 8, 5000, 204800)


def run_backward_ops() -> bool:
    """The add & norm backward ops alone, compiled with their rows dynamic
    (as in a compiled training step, which this tool cannot trace whole):
    one graph must serve every row count. Prints a line per op."""
    import torch
    from torch._dynamo.utils import counters
    from torch._subclasses.fake_tensor import FakeTensorMode

    import wmfast.ops.bias_ffn_norms  # noqa: F401  (registers the ops)
    import wmfast.ops.layer_norm  # noqa: F401

    ops = torch.ops.wmfast
    bf16 = torch.bfloat16

    def layer_norm_backward(d_out, s, keep, w):
        return ops.dropout_add_layer_norm_backward_traceable(
            d_out, None, s, keep, w, 0.1, 1e-5, bf16, bf16
        )

    def bias_ffn_norms_backward(d_out, s, keep, w):
        return ops.bias_ffn_norms_backward_traceable(
            d_out, None, s, keep, keep, w, w, w, w, 0.1, 1e-5, bf16, bf16
        )

    compiled_kernels: list[str] = []
    ok = True
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = {
            rows: (
                torch.zeros(rows, 512, device="cuda", dtype=bf16),  # d_out
                torch.zeros(rows, 512, device="cuda", dtype=bf16),  # s
                torch.zeros(rows, 512, device="cuda", dtype=torch.uint8),  # keep
                torch.zeros(512, device="cuda"),  # the weights
            )
            for rows in BACKWARD_ROWS
        }
        pretend_h100(compiled_kernels)
        for fn in (layer_norm_backward, bias_ffn_norms_backward):
            compiled = torch.compile(fn)
            graphs_before = counters["stats"]["unique_graphs"]
            result = "compiled"
            for rows, args in inputs.items():
                for t in args[:3]:
                    torch._dynamo.mark_dynamic(t, 0)  # the rows; d_model stays static
                try:
                    compiled(*args)
                    result, ok = "ran: this machine has a GPU", False
                except torch.AcceleratorError:
                    pass  # the compiled code's first device call: expected
                except Exception as e:
                    result, ok = (
                        f"FAILED at {rows} rows: {type(e).__name__}: {str(e)[:2000]}",
                        False,
                    )
                    break
            graphs = counters["stats"]["unique_graphs"] - graphs_before
            if graphs != 1:
                ok = False
            print(f"  {fn.__name__}, rows {BACKWARD_ROWS}: {result}, {graphs} graph(s)", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", nargs=8, help=argparse.SUPPRESS)
    parser.add_argument("--backward-ops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        p, dyn, dtype, mode, d, h, mlp, norm = args.case
        return 0 if run_case(p, dyn, dtype, mode, int(d), int(h), int(mlp), norm) else 1
    if args.backward_ops:
        return 0 if run_backward_ops() else 1
    failed = []
    with tempfile.TemporaryDirectory() as cache:
        # cold caches, so Triton and ptxas really compile every kernel; one
        # compile thread, so the patched process itself does the compiling
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_COMPILE_THREADS="1")
        env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        for case in CASES:
            print(
                "positional={} dynamic={} dtype={} mode={} d_model={} n_heads={} d_mlp={} "
                "norm={}".format(*case)
            )
            argv = [sys.executable, __file__, "--case", *map(str, case)]
            if subprocess.run(argv, env=env).returncode != 0:
                failed.append(case)
        print("the add & norm backward ops, rows dynamic")
        argv = [sys.executable, __file__, "--backward-ops"]
        if subprocess.run(argv, env=env).returncode != 0:
            failed.append("backward ops")
    print(f"{len(CASES) + 1 - len(failed)}/{len(CASES) + 1} cases compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
