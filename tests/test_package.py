"""Packaging facts: what importing wmfast does and does not do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


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


ROOT = Path(__file__).resolve().parents[1]


def test_the_checkouts_kernels_folder_does_not_shadow_an_installed_kernels(tmp_path):
    # run from the checkout's root (as pytest and scripts there are), a
    # top-level `import kernels` must reach the installed distribution of that
    # name (Hugging Face's, which transformers imports), not this folder
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("from kernels.layer import WHICH\n")
    (installed / "layer.py").write_text("WHICH = 'installed'\n")
    code = "import kernels, wmfast.kernels\nprint(kernels.WHICH, wmfast.kernels.__name__)\n"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["installed", "wmfast.kernels"]


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


def test_the_wheel_holds_every_module_the_kernels_and_py_typed(tmp_path):
    """A wheel built from the source tree (in a copy, so the build leaves
    nothing behind) installs every module of src/wmfast, the kernels/ folder
    as wmfast.kernels, and the PEP 561 marker."""
    pytest.importorskip("setuptools", reason="building a wheel without isolation needs it")
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    for name in ("src", "kernels"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps"]
    build += ["--no-build-isolation", "-q", "-w", str(tmp_path / "dist")]
    out = subprocess.run(build, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("wmfast-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    want = {
        f"wmfast/{p.relative_to(root / 'src/wmfast')}" for p in (root / "src/wmfast").rglob("*.py")
    }
    want |= {
        f"wmfast/kernels/{p.relative_to(root / 'kernels')}"
        for p in (root / "kernels").rglob("*.py")
    }
    want.add("wmfast/py.typed")
    assert want <= held, sorted(want - held)
