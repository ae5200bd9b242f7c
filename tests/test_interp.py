"""nnsight on fast models: every module path the reference reaches is reachable
on the fast model, saves the same activation, takes the same ablation to the
same logits, and gives the same gradients; traces compile nothing and the
compiled path is still used after them; the guide's examples and the nnsight
tutorial's operations run. Tests of one invoke per trace run with plain
``nnsight.NNsight`` too (``any_NNsight``).

nnsight reads the body of each ``with model.trace()`` block from its source
file, so the traces are written out here, not built dynamically.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from wmfast import build_model
from wmfast.check import envoy_at, reached_paths, trace_ablation
from wmfast.fast import make_fast
from wmfast.interp import HOOKS, trace_active, why_submodules_must_run

from .helpers import (
    FP32_GRADS,
    FP32_LOGITS,
    POSITIONAL_TYPES,
    grad_at,
    random_ids,
    small_config,
)

pytestmark = pytest.mark.nnsight


@pytest.fixture(scope="module")
def NNsight():
    from wmfast.interp import NNsight

    return NNsight


@pytest.fixture(scope="module", params=["wmfast.interp.NNsight", "nnsight.NNsight"])
def any_NNsight(request):
    """wmfast's NNsight, and plain nnsight.NNsight, which a user who already
    has nnsight may wrap with: tests of one invoke per trace take both (only
    batching several invokes needs wmfast's)."""
    import nnsight

    from wmfast.interp import NNsight

    return NNsight if request.param.startswith("wmfast") else nnsight.NNsight


def _configs():
    transformer = st.builds(
        lambda pe, heads, d_mlp, layers, seed: small_config(
            positional_embedding_type=pe,
            n_heads=heads,
            d_model=heads * 6,
            d_mlp=d_mlp,
            n_layers=layers,
            seed=seed,
        ),
        st.sampled_from(POSITIONAL_TYPES),
        st.sampled_from([1, 2, 3]),
        st.sampled_from([0, 16]),
        st.integers(1, 2),
        st.integers(0, 1000),
    )
    recurrent = st.builds(
        lambda cls, seed: small_config(
            model_class=cls, act_fn="tanh" if cls == "rnn" else "relu", seed=seed
        ),
        st.sampled_from(["rnn", "lstm"]),
        st.integers(0, 1000),
    )
    return st.one_of(transformer, transformer, recurrent)


def save_output(nm, path, ids):
    with nm.trace(ids):
        saved = envoy_at(nm, path).output.save()
        logits = nm.output.save()
    return saved, logits


def _assert_same(got, want):
    if isinstance(want, tuple):
        for g, w in zip(got, want, strict=True):
            _assert_same(g, w)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, **FP32_LOGITS)
    else:
        assert got == want


@given(_configs(), st.integers(0, 2**31 - 1))
def test_every_reference_path_traces_the_same_on_the_fast_model(any_NNsight, config, seed):
    reference = build_model(config, variant="reference")
    fast = make_fast(reference)
    ids = random_ids(seed, config.d_vocab, 2, 5)
    paths = reached_paths(reference, ids)
    nm_ref, nm_fast = any_NNsight(reference), any_NNsight(fast)
    for path in paths:
        want, want_logits = save_output(nm_ref, path, ids)
        got, got_logits = save_output(nm_fast, path, ids)
        _assert_same(got, want)
        torch.testing.assert_close(got_logits, want_logits, **FP32_LOGITS)
        ablated_want = trace_ablation(nm_ref, path, ids)
        ablated_got = trace_ablation(nm_fast, path, ids)
        torch.testing.assert_close(ablated_got, ablated_want, **FP32_LOGITS)
        if path in ("embedding", "transformer_encoder", "rnn_core", "lstm_core"):
            # the edit really happened (both models ignoring it would also "agree")
            assert (ablated_got - got_logits).abs().max() > 1e-4, path
    assert len(paths) == _expected_path_count(config)


def _expected_path_count(config) -> int:
    """embedding, transformer_encoder and output_layer, plus what each positional
    type calls, plus per layer: the layer, self_attn, dropout1, norm1, linear1,
    dropout, linear2, dropout2 and norm2 (nn.MultiheadAttention never calls its
    out_proj module; the rotary_qk attention calls out_proj and rotary too)."""
    if config.model_class != "transformer":
        return 4  # embedding, *_core, *_core.rnn/lstm, output_layer
    pe = config.positional_embedding_type
    pos = {"standard": 2, "rotary": 1, None: 0, "rotary_qk": 1}[pe]
    per_layer = 11 if pe == "rotary_qk" else 9
    return 3 + pos + per_layer * config.n_layers


@given(_configs(), st.integers(0, 2**31 - 1))
def test_gradients_saved_through_nnsight_match(any_NNsight, config, seed):
    reference = build_model(config, variant="reference")
    fast = make_fast(reference)
    ids = random_ids(seed, config.d_vocab, 2, 5)
    nm_ref, nm_fast = any_NNsight(reference), any_NNsight(fast)
    paths = reached_paths(reference, ids)
    if config.positional_embedding_type == "rotary_qk":
        # its (cos, sin) tables are functions of the positions alone: no
        # gradient reaches them, on the reference either
        del paths["pos_encoder"]
    for path in paths:
        torch.testing.assert_close(
            grad_at(nm_fast, path, ids),
            grad_at(nm_ref, path, ids),
            **FP32_GRADS,
            msg=lambda detail, path=path: f"{path}: {detail}",
        )


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_the_fast_model_reaches_every_path_the_reference_reaches(pe):
    reference = build_model(small_config(positional_embedding_type=pe), variant="reference")
    fast = make_fast(reference)
    ids = random_ids(0, 50, 2, 5)
    expected = reached_paths(reference, ids)
    # the module path is what a trace runs; it calls the same submodules in the same order
    order, handles = [], []
    for name, module in fast.named_modules():
        if name:
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: order.append(n)))
    fast.forward_modules(ids)
    for handle in handles:
        handle.remove()
    assert list(dict.fromkeys(order)) == list(expected)
    if pe == "rotary_qk":
        assert "transformer_encoder.layers.1.self_attn.rotary" in expected


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_under_no_grad_layer_outputs_match(NNsight, pe):
    """Under no_grad PyTorch's fused encoder path skips the reference layers'
    submodules (and so the fast model's on its traced path): compare layers."""
    reference = build_model(small_config(positional_embedding_type=pe), variant="reference").eval()
    fast = make_fast(reference)
    ids = random_ids(1, 50, 2, 6)
    nm_ref, nm_fast = NNsight(reference), NNsight(fast)
    with torch.no_grad():
        with nm_ref.trace(ids):
            want0 = nm_ref.transformer_encoder.layers[0].output.save()
            want1 = nm_ref.transformer_encoder.layers[1].output.save()
        with nm_fast.trace(ids):
            got0 = nm_fast.transformer_encoder.layers[0].output.save()
            got1 = nm_fast.transformer_encoder.layers[1].output.save()
    torch.testing.assert_close(got0, want0, **FP32_LOGITS)
    torch.testing.assert_close(got1, want1, **FP32_LOGITS)


def scale_embedding_through_source(nm, ids):
    """Reads and edits an operation inside the root's forward through
    nnsight's ``.source``: the root's forward calls forward_modules, which
    calls the embedding."""
    with nm.trace(ids):
        body = nm.source.self_forward_modules_0.source
        embedded = body.self_embedding_0.output.clone().save()
        body.self_embedding_0.output[:] *= 2
        logits = nm.output.save()
    return embedded, logits


@pytest.mark.parametrize(
    "cls, pe", [("transformer", pe) for pe in POSITIONAL_TYPES] + [("rnn", None), ("lstm", None)]
)
def test_source_operations_trace_the_same_on_the_fast_model(NNsight, cls, pe):
    config = small_config(model_class=cls, positional_embedding_type=pe, seed=4)
    reference = build_model(config, variant="reference")
    fast = make_fast(reference)
    ids = random_ids(4, config.d_vocab, 2, 6)
    want_embedded, want_logits = scale_embedding_through_source(NNsight(reference), ids)
    got_embedded, got_logits = scale_embedding_through_source(NNsight(fast), ids)
    torch.testing.assert_close(got_embedded, want_embedded, **FP32_LOGITS)
    torch.testing.assert_close(got_logits, want_logits, **FP32_LOGITS)
    # the edit really happened
    assert (got_logits - reference(ids)).abs().max() > 1e-4


def trace_through_workingmems_aliases(nm, ids):
    with nm.trace(ids):
        embedded = nm.embed.output.save()
        nm.unembed.output[:] = 0
        logits = nm.output.save()
    return embedded, logits


@pytest.mark.parametrize("variant", ["reference", "fast"])
def test_workingmems_aliases_trace_as_the_modules_they_alias(NNsight, variant):
    model = build_model(small_config(), variant=variant)
    nm = NNsight(model)
    assert nm.embed is nm.embedding and nm.unembed is nm.output_layer
    ids = random_ids(5, 50, 2, 5)
    embedded, logits = trace_through_workingmems_aliases(nm, ids)
    torch.testing.assert_close(embedded, model.embedding(ids), rtol=0, atol=0)
    assert logits.shape == (2, 5, 50) and not logits.any()


def test_trace_active_tracks_nnsight(NNsight):
    model = build_model(small_config(), variant="reference")
    seen = []
    model.transformer_encoder.register_forward_hook(
        lambda m, a, o: seen.append(trace_active(model))
    )
    nm = NNsight(model)
    model(random_ids(0, 50, 1, 3))
    with nm.trace(random_ids(0, 50, 1, 3)):
        out = nm.output.save()
    model(random_ids(0, 50, 1, 3))
    assert seen == [False, True, False]
    assert out.shape == (1, 3, 50)
    assert not trace_active(build_model(small_config()))  # a model nnsight never saw


def test_hooks_anywhere_in_the_tree_and_on_shared_modules_are_found():
    model = build_model(small_config(positional_embedding_type="standard"))
    layers = model.transformer_encoder.layers
    layers[1].linear2 = layers[0].linear2  # one module held twice
    assert why_submodules_must_run(model) is None
    for module, register in (
        (layers[0].linear2, "register_forward_hook"),
        (layers[1].self_attn.out_proj, "register_full_backward_pre_hook"),
        (model.output_layer, "register_forward_pre_hook"),
    ):
        handle = getattr(module, register)(lambda *args: None)
        assert why_submodules_must_run(model) == HOOKS
        handle.remove()
        assert why_submodules_must_run(model) is None
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert why_submodules_must_run(model) == HOOKS
    handle.remove()


def test_a_forward_set_on_an_instance_is_found_and_nnsights_own_is_not(NNsight):
    model = build_model(small_config(positional_embedding_type="rotary_qk"))
    rotary = model.transformer_encoder.layers[1].self_attn.rotary
    replaced = "transformer_encoder.layers.1.self_attn.rotary.forward is set on the instance"
    rotary.forward = rotary.forward  # its class's forward, bound on the instance
    assert why_submodules_must_run(model) is None
    rotary.forward = model.transformer_encoder.layers[0].self_attn.rotary.forward  # another's
    assert why_submodules_must_run(model) == replaced
    rotary.forward = types.MethodType(lambda self, q, k, cos, sin: (q, k), rotary)
    assert why_submodules_must_run(model) == replaced
    NNsight(model)  # nnsight keeps that forward as what its own runs
    assert why_submodules_must_run(model) == replaced
    model = build_model(small_config(positional_embedding_type="rotary_qk"))
    NNsight(model)  # every submodule gets nnsight's forward, which runs the class's
    assert all("forward" in module.__dict__ for module in model.modules())
    assert why_submodules_must_run(model) is None
    model.output_layer.forward = lambda x: x  # replaced after wrapping
    assert why_submodules_must_run(model) == "output_layer.forward is set on the instance"


def test_traces_compile_nothing_and_compiled_code_is_used_after(NNsight, monkeypatch):
    import wmfast.fast as wf

    fast = build_model(small_config(positional_embedding_type="rotary_qk")).eval()
    ids = random_ids(2, 50, 2, 7)
    with torch.no_grad():
        fast(ids)  # compile once, untraced
    compiled_calls = []
    for key, fn in list(wf._COMPILED.items()):
        monkeypatch.setitem(
            wf._COMPILED, key, lambda *a, _fn=fn, **k: compiled_calls.append(1) or _fn(*a, **k)
        )
    graphs = counters["stats"]["unique_graphs"]
    nm = NNsight(fast)
    with torch.no_grad():
        for _ in range(3):
            with nm.trace(ids):
                nm.transformer_encoder.layers[0].output[:] = 0
                out = nm.output.save()
    assert compiled_calls == [] and counters["stats"]["unique_graphs"] == graphs
    assert out.shape == (2, 7, 50)
    with torch.no_grad():
        fast(ids)
    assert compiled_calls == [1] and counters["stats"]["unique_graphs"] == graphs


def edits_session_and_stop(nm, ids):
    """nnsight workflows beyond one trace: a persistent edit on a copy and
    in place, two traces in one session (a value carried from the first into
    the second), and a trace stopped early. Returns what each saw."""
    seen = {}
    with nm.edit() as (_, edited):
        edited.transformer_encoder.layers[0].output[:] = 0
    with edited.trace(ids):
        seen["edited copy"] = edited.output.save()
    with nm.trace(ids):
        seen["original after edit"] = nm.output.save()
    with nm.edit(inplace=True):
        nm.transformer_encoder.layers[1].norm1.output[:] = 1
    with nm.trace(ids):
        seen["edited in place"] = nm.output.save()
    nm.clear_edits()
    with nm.session():
        with nm.trace(ids):
            first = nm.transformer_encoder.layers[0].output.save()
        with nm.trace(ids):
            nm.transformer_encoder.layers[0].output[:] = first * 2
            seen["session"] = nm.output.save()
    with nm.trace(ids) as tracer:
        seen["stopped"] = nm.embedding.output.save()
        tracer.stop()
    return seen


@pytest.mark.parametrize("pe", ["rotary_qk", "standard"])
def test_edits_sessions_and_early_stops_trace_the_same_on_the_fast_model(NNsight, pe):
    """The fast model tells these traces from untraced calls too (an edited
    copy is another envoy on the same module), so every edit reaches it."""
    config = small_config(positional_embedding_type=pe, seed=31)
    reference = build_model(config, variant="reference")
    fast = make_fast(reference)
    ids = random_ids(32, 50, 2, 9)
    want = edits_session_and_stop(NNsight(reference), ids)
    got = edits_session_and_stop(NNsight(fast), ids)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FP32_LOGITS, msg=name)
    plain = fast(ids)  # edits stay inside traces
    torch.testing.assert_close(got["original after edit"], plain, **FP32_LOGITS)
    for name in ("edited copy", "edited in place", "session"):
        assert (got[name] - plain).abs().max() > 1e-3, name  # the edit really happened


def tutorial_operations(nm, ids) -> dict:
    """The nnsight tutorial's operations (001_d025f61509c48238.txt) on these
    models: a logit lens inside the trace (output_layer applied to each
    layer's output: post-LN layers, no final norm), inputs read with
    ``.input``/``.inputs``, and a module's whole output replaced."""
    seen = {}
    with nm.trace(ids):
        seen["self_attn inputs"] = nm.transformer_encoder.layers[0].self_attn.inputs[0][0].save()
        seen["lens"] = [
            nm.output_layer(layer.output)[:, -1].softmax(-1).save()
            for layer in nm.transformer_encoder.layers
        ]
        seen["output_layer input"] = nm.output_layer.input.save()
    with nm.trace(ids):
        hidden = nm.transformer_encoder.layers[0].output
        nm.transformer_encoder.layers[0].output = hidden * 0.5 + 1
        seen["replaced"] = nm.output.save()
    seen["lens"] = torch.stack(seen["lens"])
    return seen


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_the_tutorials_operations_trace_the_same_on_the_fast_model(any_NNsight, pe):
    config = small_config(positional_embedding_type=pe, d_mlp=16, seed=41)
    reference = build_model(config, variant="reference")
    fast = make_fast(reference)
    ids = random_ids(42, 50, 2, 9)
    want = tutorial_operations(any_NNsight(reference), ids)
    got = tutorial_operations(any_NNsight(fast), ids)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FP32_LOGITS, msg=name)
    with torch.no_grad():
        # the last layer's lens is the logits; the replacement changed them
        torch.testing.assert_close(got["lens"][-1], fast(ids)[:, -1].softmax(-1), **FP32_LOGITS)
        assert (got["replaced"] - fast(ids)).abs().max() > 1e-3


def test_batched_invokes_each_see_their_own_rows(NNsight):
    fast = build_model(small_config(positional_embedding_type="standard"))
    nm = NNsight(fast)
    clean_ids = random_ids(3, 50, 2, 6)
    with nm.trace() as tracer:
        with tracer.invoke(clean_ids):
            clean = nm.output.save()
        with tracer.invoke(clean_ids):
            nm.pos_encoder.output[:] = 0
            ablated = nm.output.save()
    torch.testing.assert_close(clean, fast(clean_ids), **FP32_LOGITS)
    assert clean.shape == ablated.shape == (2, 6, 50)
    assert (clean - ablated).abs().max() > 1e-3


def test_batched_invokes_of_different_lengths_are_a_clear_error(NNsight):
    nm = NNsight(build_model(small_config()))
    with pytest.raises(ValueError, match="must share a sequence length"):
        with nm.trace() as tracer:
            with tracer.invoke(random_ids(0, 50, 1, 4)):
                nm.output.save()
            with tracer.invoke(random_ids(0, 50, 1, 5)):
                nm.output.save()


# -- the guide's examples (000_295ce3862cf401fc.txt), on fast models ------------------
# LanguageModel(model.model) -> wmfast.interp.NNsight(model.model): these models
# have no tokenizer. The causal-intervention example passes the input to
# trace() and then opens invokes, which nnsight 0.8 rejects ("Cannot invoke
# while the model is already running"): it is rewritten as trace() with one
# invoke(input_ids) per run.


def test_guide_accessing_activations(any_NNsight):
    from wmfast import ModelConfig, TransformerModelWrapper

    config = ModelConfig(
        model_class="transformer",
        n_layers=2,
        d_model=256,
        d_vocab=100,
        positional_embedding_type="rotary",
    )
    model = TransformerModelWrapper(config)
    traced_model = any_NNsight(model.model)
    input_ids = random_ids(0, 100, 2, 10).to(model.device)
    with traced_model.trace(input_ids):
        embeddings = traced_model.embedding.output.save()
        encoder_output = traced_model.transformer_encoder.output.save()
    assert embeddings.shape == encoder_output.shape == (2, 10, 256)


def test_guide_intervening_on_activations(any_NNsight):
    model = build_model(small_config(positional_embedding_type="standard"))
    traced_model = any_NNsight(model)
    input_ids = random_ids(1, 50, 2, 8)
    with traced_model.trace(input_ids):
        traced_model.embedding.output[:] = 0
        output = traced_model.output_layer.output.save()
    # with the embeddings zeroed, only positions tell the sequences apart:
    # both rows (same length) give the same logits
    torch.testing.assert_close(output[0], output[1], **FP32_LOGITS)
    assert (output - model(input_ids)).abs().max() > 1e-3


@pytest.mark.parametrize("cls, core", [("rnn", "rnn_core"), ("lstm", "lstm_core")])
def test_guide_rnn_lstm(any_NNsight, cls, core):
    model = build_model(small_config(model_class=cls, act_fn="tanh" if cls == "rnn" else "relu"))
    traced = any_NNsight(model)
    input_ids = random_ids(2, 50, 2, 8)
    with traced.trace(input_ids):
        embeddings = traced.embedding.output.save()
        getattr(traced, core).output[:] = 0  # zero out the RNN outputs
        logits = traced.output.save()
    assert embeddings.shape == (2, 8, 32)
    # zero hidden states leave only the output layer's bias
    torch.testing.assert_close(logits, model.output_layer.bias.expand_as(logits), **FP32_LOGITS)


@pytest.mark.parametrize("pe", ["standard", "rotary"])
def test_guide_causal_intervention(NNsight, pe):
    model = build_model(small_config(positional_embedding_type=pe))
    traced_model = NNsight(model)
    input_ids = random_ids(3, 50, 2, 8)
    with traced_model.trace() as tracer:
        with tracer.invoke(input_ids):
            normal_output = traced_model.output_layer.output.save()
        with tracer.invoke(input_ids):
            traced_model.pos_encoder.output[:] = 0
            intervened_output = traced_model.output_layer.output.save()
    difference = normal_output - intervened_output
    assert difference.abs().mean() > 1e-3  # positions matter
    torch.testing.assert_close(normal_output, model(input_ids), **FP32_LOGITS)


def test_guide_causal_intervention_on_rotary_qk(NNsight):
    """The "rotary_qk" pos_encoder returns the (cos, sin) tables, a tuple, so
    the guide's ``pos_encoder.output[:] = 0`` does not apply (zeroing both
    would zero every query and key). Its ablation of positions, cos 1 and
    sin 0 (README), gives the model without positions: the same seed builds
    the same weights, since this pos_encoder holds none."""
    config = small_config(positional_embedding_type="rotary_qk", seed=21)
    traced_model = NNsight(build_model(config))
    without_positions = build_model(config.replace(positional_embedding_type=None))
    input_ids = random_ids(22, 50, 2, 8)
    with traced_model.trace() as tracer:
        with tracer.invoke(input_ids):
            normal_output = traced_model.output_layer.output.save()
        with tracer.invoke(input_ids):
            cos, sin = traced_model.pos_encoder.output
            cos[:] = 1  # every angle 0: no rotation
            sin[:] = 0
            intervened_output = traced_model.output_layer.output.save()
    assert (normal_output - intervened_output).abs().mean() > 1e-3  # positions matter
    torch.testing.assert_close(intervened_output, without_positions(input_ids), **FP32_LOGITS)


def test_patterns_and_cache_take_an_nnsight_wrapped_model(NNsight):
    import wmfast
    from wmfast.interp import unwrap

    model = build_model(small_config(positional_embedding_type="rotary_qk", seed=14))
    wrapped = NNsight(model)
    assert unwrap(wrapped) is model and unwrap(model) is model
    ids = random_ids(15, 50, 2, 6)
    for got, want in zip(
        wmfast.attention_patterns(wrapped, ids), wmfast.attention_patterns(model, ids), strict=True
    ):
        assert torch.equal(got, want)
    (_, got), (_, want) = wmfast.run_with_cache(wrapped, ids), wmfast.run_with_cache(model, ids)
    assert got.keys() == want.keys()
    assert torch.equal(got["transformer_encoder.layers.1"], want["transformer_encoder.layers.1"])
