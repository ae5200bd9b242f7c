"""workingmem's own outputs reproduced: same seed -> same weights (bitwise),
same weights + inputs -> same logits (spec tolerance)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from wmfast import CheckpointError, ModelConfig, build_model
from wmfast.checkpoint import load_state_dict_strict, without_aliases
from wmfast.models import create_model

from .helpers import FP32_LOGITS, GOLDEN, reference_model

FULL_FILES = sorted(p.name for p in GOLDEN.glob("*.pt") if not p.name.endswith(".compact.pt"))


def _golden(name: str) -> dict:
    return torch.load(GOLDEN / name, weights_only=True)


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", FULL_FILES)
def test_seed_gives_workingmems_initial_weights_bitwise(name):
    golden = _golden(name)
    model = reference_model(ModelConfig.from_dict(golden["config"]))
    ours = model.state_dict()
    theirs = without_aliases(golden["state_dict"])
    assert list(ours) == list(theirs)  # same keys, same order
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("fastpath", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("name", FULL_FILES)
def test_golden_weights_give_golden_logits(name, fastpath):
    golden = _golden(name)
    torch.manual_seed(12345)  # construction draws from the RNG; the load overwrites it all
    model = create_model(ModelConfig.from_dict(golden["config"]))
    load_state_dict_strict(model, golden["state_dict"], name)  # alias keys included
    model.eval()
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with torch.no_grad():
            logits = model(golden["input_ids"])
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    torch.testing.assert_close(logits, golden["logits"], **FP32_LOGITS)
    # with grad enabled PyTorch never takes its fused path
    torch.testing.assert_close(model(golden["input_ids"]).detach(), golden["logits"], **FP32_LOGITS)


@pytest.mark.parametrize("variant", ["reference", "fast"])
@pytest.mark.parametrize("name", FULL_FILES)
def test_model_load_state_dict_takes_workingmems_state_dict(name, variant):
    """``model.load_state_dict(torch.load("best_model.pth"))`` on a workingmem
    file, whose state_dict holds embedding and output_layer twice (also as
    ``embed``/``unembed``), loads strictly."""
    golden = _golden(name)
    assert "unembed.bias" in golden["state_dict"]
    model = build_model(ModelConfig.from_dict(golden["config"]).replace(seed=7), variant=variant)
    model.load_state_dict(golden["state_dict"])  # strict: raises on a key left over
    # (with grad: the fast CPU model then compiles nothing; its compiled path has its own tests)
    logits = model.eval()(golden["input_ids"]).detach()
    torch.testing.assert_close(logits, golden["logits"], **FP32_LOGITS)
    # the same under another module, and only the aliases: mapped onto what they alias
    aliases_only = {
        k: v
        for k, v in golden["state_dict"].items()
        if not k.startswith(("embedding.", "output_layer."))
    }
    outer = torch.nn.ModuleDict(
        {"model": build_model(model.config.replace(seed=8), variant=variant)}
    )
    outer.load_state_dict({f"model.{k}": v for k, v in aliases_only.items()})
    assert torch.equal(outer["model"].output_layer.bias, golden["state_dict"]["unembed.bias"])


def test_model_load_state_dict_refuses_aliases_that_disagree():
    golden = _golden("lstm.pt")
    state = dict(golden["state_dict"], **{"embed.weight": golden["state_dict"]["embed.weight"] + 1})
    model = build_model(ModelConfig.from_dict(golden["config"]))
    with pytest.raises(CheckpointError, match="'embed.weight' disagrees with 'embedding.weight'"):
        model.load_state_dict(state)


def test_full_default_model_matches_compact_golden():
    golden = _golden("transformer_defaults_vocab350.compact.pt")
    model = reference_model(ModelConfig.from_dict(golden["config"]))
    ours = model.state_dict()
    expected = {
        k: v
        for k, v in golden["state_dict_sha256"].items()
        if not k.startswith(("embed.", "unembed."))
    }
    assert list(ours) == list(expected)
    for key, tensor in ours.items():
        assert list(tensor.shape) == golden["state_dict_shapes"][key], key
        assert _sha256(tensor) == expected[key], key
    # alias keys hold the same bytes as what they alias
    assert golden["state_dict_sha256"]["embed.weight"] == expected["embedding.weight"]
    model.eval()
    with torch.no_grad():
        logits = model(golden["input_ids"])
    torch.testing.assert_close(logits, golden["logits"], **FP32_LOGITS)


def _full_golden_dir() -> Path | None:
    for candidate in (
        os.environ.get("WMFAST_GOLDEN_DIR"),
        Path(__file__).resolve().parents[2] / "shared" / "golden",
    ):
        if candidate and (Path(candidate) / "transformer_defaults_vocab350.pt").is_file():
            return Path(candidate)
    return None


@pytest.mark.skipif(_full_golden_dir() is None, reason="full golden file not beside the checkout")
def test_full_default_model_matches_full_golden_file():
    golden = torch.load(_full_golden_dir() / "transformer_defaults_vocab350.pt", weights_only=True)
    model = reference_model(ModelConfig.from_dict(golden["config"]))
    theirs = without_aliases(golden["state_dict"])
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key
