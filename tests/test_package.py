"""Packaging facts: what importing wmfast does and does not do."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_never_touches_cuda():
    code = (
        "import sys, torch, wmfast, wmfast.kernels\n"
        "assert 'nnsight' not in sys.modules, 'nnsight imported'\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print(wmfast.kernels.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "wmfast.kernels"


def test_public_names():
    import wmfast

    for name in (
        "ModelConfig",
        "TrainingConfig",
        "ModelWrapper",
        "TransformerModelWrapper",
        "RNNModelWrapper",
        "LSTMModelWrapper",
        "build_model",
    ):
        assert hasattr(wmfast, name), name
