"""The reference Transformer: module paths, state_dict keys, parameter counts,
causality, and the semantics each positional type promises."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast.models.transformer import RotaryEncoderLayer

from ..helpers import FP32_LOGITS, POSITIONAL_TYPES, random_ids, reference_model, small_config


def _layer_keys(i: int) -> list[str]:
    p = f"transformer_encoder.layers.{i}."
    return [
        p + "self_attn.in_proj_weight",
        p + "self_attn.in_proj_bias",
        p + "self_attn.out_proj.weight",
        p + "self_attn.out_proj.bias",
        p + "linear1.weight",
        p + "linear1.bias",
        p + "linear2.weight",
        p + "linear2.bias",
        p + "norm1.weight",
        p + "norm1.bias",
        p + "norm2.weight",
        p + "norm2.bias",
    ]


POS_KEYS = {
    "standard": ["pos_encoder.pos_embedding.weight"],
    "rotary": ["pos_encoder.inv_freq"],
    None: [],
    "rotary_qk": ["pos_encoder.inv_freq"],
}


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_state_dict_keys(pe):
    model = reference_model(small_config(positional_embedding_type=pe, n_layers=3))
    expected = (
        ["embedding.weight"]
        + POS_KEYS[pe]
        + [k for i in range(3) for k in _layer_keys(i)]
        + ["output_layer.weight", "output_layer.bias"]
    )
    assert list(model.state_dict()) == expected


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_documented_module_paths_exist(pe):
    model = reference_model(small_config(positional_embedding_type=pe))
    paths = dict(model.named_modules())
    for path in [
        "embedding",
        "transformer_encoder",
        "transformer_encoder.layers.0.self_attn",
        "transformer_encoder.layers.1.linear1",
        "transformer_encoder.layers.1.norm2",
        "output_layer",
    ]:
        assert path in paths, path
    assert ("pos_encoder" in paths) == (pe is not None)
    assert ("transformer_encoder.layers.1.self_attn.rotary" in paths) == (pe == "rotary_qk")
    assert not any(p in paths for p in ("embed", "unembed"))  # no alias modules
    assert isinstance(model.transformer_encoder, torch.nn.TransformerEncoder)
    assert all(
        isinstance(m, torch.nn.TransformerEncoderLayer) for m in model.transformer_encoder.layers
    )


def test_positional_modules_keep_workingmems_attributes():
    rotation = reference_model(small_config(positional_embedding_type="rotary")).pos_encoder
    assert (rotation.dim, rotation.base) == (32, 10000)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(6))
    want = torch.cat((-x[..., 16:], x[..., :16]), dim=-1)
    torch.testing.assert_close(rotation.rotate_half(x), want, rtol=0, atol=0)
    tables = reference_model(small_config(positional_embedding_type="rotary_qk")).pos_encoder
    assert (tables.dim, tables.base) == (8, 10000)  # the head dim
    assert reference_model(small_config(positional_embedding_type="standard")).pos_encoder.learnable


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
@pytest.mark.parametrize("d_mlp", [0, 40])
def test_parameter_count(pe, d_mlp):
    d, v, n, L = 32, 50, 64, 2
    model = reference_model(small_config(positional_embedding_type=pe, d_mlp=d_mlp))
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * d_mlp + d_mlp) + (d_mlp * d + d) + 4 * d
    expected = v * d + L * per_layer + (d * v + v) + (n * d if pe == "standard" else 0)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_layers_start_with_identical_biases_and_distinct_weights():
    # nn.TransformerEncoder deep-copies ONE layer; only the xavier pass (2-D params) differs
    model = reference_model(small_config(d_mlp=16))
    l0, l1 = model.transformer_encoder.layers
    assert torch.equal(l0.linear1.bias, l1.linear1.bias)
    assert not torch.equal(l0.linear1.weight, l1.linear1.weight)


def test_rotary_qk_seed_gives_the_same_weights_as_no_positions():
    a = reference_model(small_config(positional_embedding_type=None, seed=7)).state_dict()
    b = reference_model(small_config(positional_embedding_type="rotary_qk", seed=7)).state_dict()
    b.pop("pos_encoder.inv_freq")
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


configs = st.fixed_dictionaries(
    dict(
        pe=st.sampled_from(POSITIONAL_TYPES),
        heads=st.sampled_from([1, 2, 3, 4]),
        # head_half >= 2: with d_model 2 the post-LN output is +-1 whatever the input,
        # so no change at position t could show
        head_half=st.integers(2, 6),
        d_mlp=st.sampled_from([0, 8, 33]),
        act=st.sampled_from(["relu", "gelu"]),
        n_layers=st.integers(1, 3),
        seq_len=st.integers(1, 19),
        batch=st.integers(1, 3),
        seed=st.integers(0, 2**16),
    )
)


def _model_from(c):
    return reference_model(
        small_config(
            positional_embedding_type=c["pe"],
            n_heads=c["heads"],
            d_model=2 * c["heads"] * c["head_half"],
            d_mlp=c["d_mlp"],
            act_fn=c["act"],
            n_layers=c["n_layers"],
            seed=c["seed"],
        )
    )


@given(configs, st.data())
def test_causal_future_tokens_do_not_change_past_logits(c, data):
    model = _model_from(c).eval()
    ids = random_ids(c["seed"], 50, c["batch"], c["seq_len"])
    t = data.draw(st.integers(0, c["seq_len"] - 1), label="changed position")
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 50
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    assert (before[:, t] - after[:, t]).abs().max() > 0  # position t itself did change


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_eval_no_grad_matches_eval_with_grad_and_train_without_dropout(pe):
    model = reference_model(small_config(positional_embedding_type=pe))
    ids = random_ids(3, 50, 2, 11)
    model.eval()
    with torch.no_grad():
        fused = model(ids)
    unfused = model(ids).detach()
    train = model.train()(ids).detach()
    torch.testing.assert_close(fused, unfused, **FP32_LOGITS)
    torch.testing.assert_close(train, unfused, **FP32_LOGITS)


def test_rotary_position_zero_is_doubled():
    model = reference_model(small_config(positional_embedding_type="rotary")).eval()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    rotation = model.pos_encoder(x)
    assert torch.equal(rotation[:, 0], x[:, 0])  # angle 0: cos 1, sin 0
    assert not torch.allclose(rotation[:, 1:], x[:, 1:])
    # and the model adds it: the encoder sees 2x at position 0
    seen = {}
    model.transformer_encoder.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    ids = random_ids(4, 50, 2, 5)
    model(ids)
    scaled = model.embedding(ids) * 32**0.5
    torch.testing.assert_close(seen["x"][:, 0], 2 * scaled[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("pe", ["standard", "rotary_qk"])
def test_d_mlp_zero_ffn_outputs_exactly_linear2_bias(pe):
    model = reference_model(small_config(positional_embedding_type=pe, d_mlp=0)).train()
    layer = model.transformer_encoder.layers[0]
    with torch.no_grad():
        layer.linear2.bias.normal_(generator=torch.Generator().manual_seed(5))
    seen = {}
    layer.linear2.register_forward_hook(lambda m, args, out: seen.update(out=out))
    model(random_ids(5, 50, 3, 7))
    assert torch.equal(seen["out"], layer.linear2.bias.expand_as(seen["out"]))


def _scores_from_rotated_qk(model, ids) -> list[torch.Tensor]:
    """q.k scores (B, H, T, T) of each layer, from self_attn.rotary's output."""
    scores = []

    def hook(module, args, out):
        q, k = out  # (B, T, H, D)
        scores.append(torch.einsum("bthd,bshd->bhts", q.double(), k.double()))

    for layer in model.transformer_encoder.layers:
        layer.self_attn.rotary.register_forward_hook(hook)
    model(ids)
    return scores


@pytest.mark.parametrize("mode", ["eval_no_grad", "eval_grad", "train"])
def test_rotary_qk_scores_depend_only_on_relative_position(mode):
    model = reference_model(
        small_config(positional_embedding_type="rotary_qk", n_heads=2, d_model=16)
    )
    model.train(mode == "train")
    # one repeated token: layer 0 sees the same q and k content at every position,
    # so after RoPE its scores can depend on position only through t - s
    ids = torch.full((2, 9), 7)
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        scores = _scores_from_rotated_qk(model, ids)
    assert len(scores) == 2  # rotary ran in every layer: no fused path skipped it
    s = scores[0]
    for offset in range(-8, 9):
        diag = torch.diagonal(s, offset=offset, dim1=-2, dim2=-1)
        # q and k are rotated in fp32: equal up to fp32 rounding (measured 2.4e-7 rel)
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag), **FP32_LOGITS)
    # and the scores are not all equal: position does matter
    assert not torch.allclose(s[..., 0, 0], s[..., 5, 0])


def test_rotary_qk_layer_never_takes_the_fused_fast_path():
    model = reference_model(small_config(positional_embedding_type="rotary_qk")).eval()
    calls = []
    for layer in model.transformer_encoder.layers:
        assert isinstance(layer, RotaryEncoderLayer)
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(random_ids(1, 50, 2, 6))
    assert len(calls) == 2


@pytest.mark.parametrize("pe", ["standard", "rotary_qk"])
def test_pos_encoder_output_has_a_real_batch_dimension(pe):
    model = reference_model(small_config(positional_embedding_type=pe))
    x = torch.randn(3, 5, 32)
    out = model.pos_encoder(x)
    for t in out if isinstance(out, tuple) else (out,):
        assert t.shape[0] == 3 and t.stride(0) != 0
        t[0].zero_()  # an edit of one sequence's slice ...
        assert t[1].abs().sum() > 0  # ... leaves the others alone


def test_rotary_qk_tables_shape_and_dtype():
    model = reference_model(small_config(positional_embedding_type="rotary_qk", n_heads=2))
    cos, sin = model.pos_encoder(torch.randn(3, 5, 32))
    assert cos.shape == sin.shape == (3, 5, 8) and cos.dtype == sin.dtype == torch.float32


@pytest.mark.parametrize("pe", ["rotary", "rotary_qk"])
def test_inv_freq_stays_fp32_when_the_model_is_cast(pe):
    model = reference_model(small_config(positional_embedding_type=pe))
    before = model.pos_encoder.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.pos_encoder.inv_freq.dtype == torch.float32
    assert torch.equal(model.pos_encoder.inv_freq, before)
    assert model.embedding.weight.dtype == torch.bfloat16
    logits = model.eval()(random_ids(2, 50, 2, 6))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_bf16_autocast_is_close_to_fp32(pe):
    model = reference_model(small_config(positional_embedding_type=pe)).eval()
    ids = random_ids(9, 50, 2, 12)
    reference = model(ids).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids).detach()
    torch.testing.assert_close(low.float(), reference, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_deepcopy_and_pickle_keep_the_function(pe):
    model = reference_model(small_config(positional_embedding_type=pe)).eval()
    ids = random_ids(2, 50, 2, 8)
    expected = model(ids)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(ids), expected, rtol=0, atol=0)
