"""run_with_cache (wmfast.activations): every submodule's output by its path,
in every mode, equal to what the forward as one function of the weights
records under the same paths; fast models give the reference's cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast import run_with_cache
from wmfast.fast import make_fast
from wmfast.interp import why_submodules_must_run
from wmfast.models.transformer_functional import gather_weights, statics_of, transformer_forward

from .helpers import (
    DEVICES,
    FP32_LOGITS,
    POSITIONAL_TYPES,
    random_ids,
    reference_and_fast,
    reference_model,
    small_config,
)

MODES = {
    "eval, no grad": (False, False),  # where the reference's fused encoder path runs
    "eval, grad": (False, True),
    "train": (True, True),
}


def recorded_by_the_functional_forward(model, ids):
    recorded = {}
    with torch.no_grad():
        logits = transformer_forward(
            gather_weights(model), ids, statics_of(model), record=recorded.__setitem__
        )
    return logits, recorded


def paths_that_run(model) -> set[str]:
    """Every submodule path but the containers (ModuleList) and
    nn.MultiheadAttention's out_proj, whose weights it uses without calling it
    (rotary_qk's attention calls its out_proj)."""
    return {
        path
        for path, module in model.named_modules()
        if path
        and not isinstance(module, torch.nn.ModuleList)
        and not (
            path.endswith("self_attn.out_proj") and model.positional_embedding_type != "rotary_qk"
        )
    }


@given(
    pe=st.sampled_from(POSITIONAL_TYPES),
    mode=st.sampled_from(sorted(MODES)),
    d_mlp=st.sampled_from([0, 24]),
    seq_len=st.sampled_from([1, 6]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cache_holds_every_submodule_output_in_every_mode(pe, mode, d_mlp, seq_len, seed):
    config = small_config(positional_embedding_type=pe, d_mlp=d_mlp, seed=seed)
    model = reference_model(config)
    train, grad = MODES[mode]
    model.train(train)
    ids = random_ids(seed, config.d_vocab, 2, seq_len)
    with torch.set_grad_enabled(grad):
        logits, cache = run_with_cache(model, ids)
    want_logits, recorded = recorded_by_the_functional_forward(model, ids)

    assert set(cache) == paths_that_run(model)
    torch.testing.assert_close(logits, want_logits, **FP32_LOGITS)
    for path, want in recorded.items():
        got = cache[path]
        if path.endswith("self_attn"):
            got = got[0]  # (output, None), as nn.MultiheadAttention returns it
        for g, w in zip(
            got if isinstance(got, tuple) else (got,),
            want if isinstance(want, tuple) else (want,),
            strict=True,
        ):
            torch.testing.assert_close(g, w, **FP32_LOGITS, msg=lambda m, p=path: f"{p}: {m}")
    assert cache["output_layer"] is logits
    assert logits.requires_grad == grad


@pytest.mark.parametrize("cls", ["rnn", "lstm"])
def test_recurrent_models_cache_their_cores(cls):
    config = small_config(model_class=cls, act_fn="tanh" if cls == "rnn" else "relu", seed=2)
    model = reference_model(config)
    ids = random_ids(3, config.d_vocab, 2, 7)
    logits, cache = run_with_cache(model, ids)
    core = cache[f"{cls}_core"]
    torch.testing.assert_close(model.output_layer(core), logits, rtol=0, atol=0)
    assert torch.equal(cache[f"{cls}_core.{cls}"][0], core)  # (output, h_n) of nn.RNN/nn.LSTM
    torch.testing.assert_close(cache["embedding"], model.embedding(ids), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_fast_models_give_the_reference_cache_and_keep_their_fast_path(pe, device):
    config = small_config(positional_embedding_type=pe, seed=4)
    reference, fast = reference_and_fast(config, device)
    ids = random_ids(5, config.d_vocab, 3, 9).to(device)
    (_, want), (_, got) = run_with_cache(reference, ids), run_with_cache(fast, ids)
    assert set(got) == set(want)
    for path in want:
        for g, w in zip(
            torch.utils._pytree.tree_leaves(got[path]),
            torch.utils._pytree.tree_leaves(want[path]),
            strict=True,
        ):
            torch.testing.assert_close(g, w, **FP32_LOGITS)
    assert why_submodules_must_run(fast) is None  # the hooks are gone: later calls run fast again


def test_cached_tensors_carry_gradients():
    model = reference_model(small_config(positional_embedding_type="rotary_qk", seed=6))
    _, cache = run_with_cache(model, random_ids(7, 50, 2, 5))
    q, k = cache["transformer_encoder.layers.0.self_attn.rotary"]
    (q * k).sum().backward()
    grad = model.transformer_encoder.layers[0].self_attn.in_proj_weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_names_select_paths_and_unknown_names_are_clear_errors():
    model = reference_model(small_config(positional_embedding_type="standard"))
    ids = random_ids(8, 50, 1, 4)
    _, cache = run_with_cache(model, ids, names=["pos_encoder", "transformer_encoder.layers.1"])
    assert list(cache) == ["pos_encoder", "transformer_encoder.layers.1"]
    with pytest.raises(
        ValueError, match=r"no submodule 'transformer_encoder.layer.1'.*did you mean"
    ):
        run_with_cache(model, ids, names=["transformer_encoder.layer.1"])


def test_a_failing_forward_leaves_no_hooks():
    model = make_fast(reference_model(small_config()))
    with pytest.raises(ValueError, match="out of range"):
        run_with_cache(model, torch.full((1, 4), 50))
    assert why_submodules_must_run(model) is None


@pytest.mark.parametrize("pe, act_fn", [("rotary_qk", "relu"), ("standard", "gelu")])
def test_the_ffn_dropout_holds_the_neurons_after_the_activation_in_eval_mode(pe, act_fn):
    """README's pointer for neuron activations: ``layers[i].dropout`` runs
    right after the activation."""
    model = reference_model(small_config(positional_embedding_type=pe, act_fn=act_fn, seed=11))
    _, cache = run_with_cache(model.eval(), random_ids(12, 50, 2, 7))
    activation = torch.nn.functional.relu if act_fn == "relu" else torch.nn.functional.gelu
    for i in range(2):
        path = f"transformer_encoder.layers.{i}"
        assert torch.equal(cache[f"{path}.dropout"], activation(cache[f"{path}.linear1"]))


def test_the_logit_lens_of_the_last_layer_is_the_logits():
    """README's logit lens: post-LN layers and no final norm, so output_layer
    applies to any layer's output, and on the last one gives the logits."""
    model = reference_model(small_config(positional_embedding_type="rotary", seed=13)).eval()
    logits, cache = run_with_cache(model, random_ids(14, 50, 2, 7))
    lens = model.output_layer(cache["transformer_encoder.layers.1"])
    torch.testing.assert_close(lens, logits, rtol=0, atol=0)
