"""The README's Python examples run as a reader runs them: in order, in one
namespace, in one working directory. Only the training example's sizes are
shrunk (the same call on 32 short sequences for one epoch), and the names the
README leaves to the reader (a model you have, token ids) are filled in."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"
SHRINK = {
    "n_sequences=10_000": "n_sequences=32",
    "n_sequences=500": "n_sequences=8",
    "seq_len=200": "seq_len=4",
    "epochs=60": "epochs=1",
}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shrink(block: str) -> str:
    for big, small in SHRINK.items():
        block = block.replace(big, small)
    return block


@pytest.mark.nnsight
def test_readme_python_examples_run_in_order(tmp_path, monkeypatch):
    import wmfast

    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 6
    assert any(big in block for block in blocks for big in SHRINK)  # the training example
    namespace: dict = {"torch": torch, "wmfast": wmfast}
    for number, block in enumerate(blocks, start=1):
        if "reference_model" in block or "input_ids" in block:
            # what the README leaves to the reader: a model you have, token ids
            config = namespace["config"]
            namespace.setdefault("reference_model", wmfast.build_model(config, variant="reference"))
            gen = torch.Generator().manual_seed(number)
            namespace.setdefault(
                "input_ids", torch.randint(1, config.d_vocab, (2, 12), generator=gen)
            )
        if "rotated" in block:
            _, cache = wmfast.run_with_cache(
                wmfast.build_model(namespace["config"]), namespace["input_ids"]
            )
            namespace["rotated"] = cache["transformer_encoder.layers.0.self_attn.rotary"]
        source, filename = shrink(block), f"<README.md python block {number}>"
        # nnsight reads a trace's `with` body back from its source file
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            exec(compile(source, filename, "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {number} failed:\n{block}") from exc
    # the traced and the head ablation changed the logits; the cache and patterns have their shapes
    assert not torch.allclose(namespace["clean"], namespace["ablated"])
    assert not torch.allclose(namespace["clean"], namespace["logits_without_head"])
    assert namespace["lens"].shape == namespace["logits"].shape
    assert namespace["pattern"].shape == (2, 4, 12, 12)
