"""Sequences of what users do to a model, done alike to a reference model and
to a fast one: after every step the two compute the same.

A fast model keeps state between calls that a reference model does not: its
plan per call context, compiled graphs shared by configuration, the per-call
walk that looks for hooks and replaced forwards, the check of the module tree
against what the fast path computes. The gaps found so far (a forward replaced
on an instance, a sparse embedding, meta-device builds) each came from one
user operation meeting that state. This hypothesis state machine draws
operations in random orders (mode switches, dtype casts, frozen parameters,
loads, hooks, replaced forwards, copies, pickling, conversions between the
variants, changed dropout and eps, autocast, nnsight ablations and
gradients read in traces), and compares the logits after every step, every
parameter gradient after each training step and each gradient read through
nnsight.

The models are separate (not sharing parameters), so that every operation is
done to each; after a training step the fast model's weights are set to the
reference's again, so that later comparisons are held to the spec's
tolerances rather than to accumulated rounding.
"""

from __future__ import annotations

import copy
import importlib.util
import io

import pytest
import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from wmfast import build_model
from wmfast.check import reached_paths, trace_ablation
from wmfast.fast import FastOptions, is_fast, make_fast, make_reference
from wmfast.ops import mlp_eager, output_layer_eager

from .helpers import (
    FP32_GRADS,
    FP32_LOGITS,
    HalvedForward,
    assert_low_precision_grads_near_exact,
    grad_at,
    grads_across_relu_kinks,
    random_ids,
    small_config,
)

# fp64 runs hold tighter: the same math, only summed in other orders
FP64_LOGITS = dict(rtol=1e-9, atol=1e-10)
FP64_GRADS_AFTER_A_LOSS = dict(rtol=1e-8, atol=1e-10)

LOW_PRECISION = (torch.bfloat16, torch.float16)  # judged against fp64 (models_to_compare)
SHAPES = [(2, 5), (3, 8)]  # (batch, seq_len); few, so the compiled case compiles little
HAS_NNSIGHT = importlib.util.find_spec("nnsight") is not None


def scale_output_hook(module, inputs, output):
    if isinstance(output, torch.Tensor):
        return output * 1.5
    if isinstance(output, tuple) and isinstance(output[0], torch.Tensor):
        return (output[0] * 1.5, *output[1:])
    return None


class ReferenceAndFast(RuleBasedStateMachine):
    """Subclassed per model below (``machine``)."""

    MODEL_CLASS = "transformer"
    POSITIONAL: str | None = "standard"
    OPTIONS: dict = {}  # FastOptions
    CASTS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    AUTOCAST = True
    DEVICE = "cpu"
    COMPILED = False  # a transformer whose fast model compiles (machine())
    NAMED_KERNELS: tuple[str, ...] = ()  # the options set to "triton" (machine())

    @initialize(
        seed=st.integers(0, 1000),
        d_mlp=st.sampled_from([0, 48]),
        act_fn=st.sampled_from(["relu", "other"]),
        dropout=st.sampled_from([0.0, 0.1]),
    )
    def build(self, seed, d_mlp, act_fn, dropout):
        changes = dict(model_class=self.MODEL_CLASS, seed=seed, dropout=dropout)
        if self.MODEL_CLASS == "transformer":
            act_fn = "gelu" if act_fn == "other" else act_fn
            changes.update(positional_embedding_type=self.POSITIONAL, d_mlp=d_mlp, act_fn=act_fn)
        elif self.MODEL_CLASS == "rnn":
            changes.update(act_fn="tanh" if act_fn == "other" else act_fn)
        self.config = small_config(**changes)
        self.reference = build_model(self.config, variant="reference")
        self.fast = build_model(
            self.config, variant="fast", fast_options=FastOptions(**self.OPTIONS)
        )
        self.reference.to(self.DEVICE), self.fast.to(self.DEVICE)
        self.fast.load_state_dict(self.reference.state_dict())
        self.dtype = torch.float32
        self.dropout = dropout
        self.hooks: list = []
        self.replaced: list[str] = []
        self.steps = 0
        ids = self.ids(0, *SHAPES[0])
        # the paths the module path calls (as `wmfast check` walks them): not
        # out_proj, whose weights nn.MultiheadAttention reads without a call
        self.called = list(reached_paths(self.reference, ids))

    def ids(self, seed: int, batch: int, seq_len: int) -> torch.Tensor:
        return random_ids(seed, self.config.d_vocab, batch, seq_len).to(self.DEVICE)

    def models(self):
        return self.reference, self.fast

    def models_to_compare(self) -> tuple[torch.nn.Module, ...]:
        """(reference, fast), and for bf16 and fp16 models an fp64 copy of the
        reference to judge both by: two bf16 computations that round in
        other places differ by a few bf16 steps (up to 0.033 at logits of
        scale 3 on these models), and the fast one is the closer of the two
        to exact arithmetic (its compiled calls keep fp32 inside)."""
        if self.dtype not in LOW_PRECISION:
            return self.reference, self.fast
        return self.reference, self.fast, copy.deepcopy(self.reference).double()

    def assert_same(self, name: str, want, got, exact=None) -> None:
        """``got`` (fast) equals ``want`` (reference) to the spec's tolerances;
        or, given ``exact`` (bf16/fp16 runs), it is at most twice as far from it as
        ``want``, plus a bf16 step of the value's scale."""
        if exact is None:
            tolerances = self.tolerances(grads=name != "logits")
            torch.testing.assert_close(got, want, **tolerances, msg=name)
            return
        assert got.shape == want.shape, name
        if exact.numel() == 0:  # (d_mlp 0's empty weights)
            return
        got, want, exact = (t.detach() for t in (got, want, exact))
        assert_low_precision_grads_near_exact([name], [got], [want], [exact.double()])

    def tolerances(self, grads: bool) -> dict:
        return {
            (torch.float32, False): FP32_LOGITS,
            (torch.float32, True): FP32_GRADS,
            (torch.float64, False): FP64_LOGITS,
            (torch.float64, True): FP64_GRADS_AFTER_A_LOSS,
        }[self.dtype, grads]

    def on_each(self, call) -> list | None:
        """``call`` on each model to compare: the results, or None where one
        raised, after checking that each raised the same type of error (some
        sequences fail on the reference itself: a model deep-copied after
        nnsight wrapped a submodule whose forward had been replaced runs the
        original's forward, whose weights a later cast does not reach)."""
        results = []
        for model in self.models_to_compare():
            try:
                results.append(call(model))
            except Exception as error:  # noqa: BLE001 (compared between the models)
                results.append(type(error))
        reference, fast = results[:2]
        if isinstance(reference, type) or isinstance(fast, type):
            assert fast == reference, f"reference: {reference}, fast: {fast}"
            return None
        # (the fp64 judge of bf16 runs may fail where both did not: no verdict)
        return None if any(isinstance(r, type) for r in results) else results

    def dropout_draws_differ(self, grad: bool) -> bool:
        """Whether a call draws other dropout masks on the fast model (its
        compiled no-grad forward in train mode: README, Dropout; the CPU
        training call draws the reference's; the named norm kernels and all
        of CUDA are not judged) or on the fp64 judge of bf16."""
        return (
            self.dropout > 0
            and self.reference.training
            and (
                not grad
                or self.dtype in LOW_PRECISION
                or self.DEVICE != "cpu"
                or "norm" in self.NAMED_KERNELS  # (its kernels draw their own masks)
            )
        )

    @invariant()
    def same_logits(self):
        """After every operation, one call on fixed ids: with and without
        grad and at each shape in turn."""
        if not hasattr(self, "config"):
            return  # (before build)
        self.steps += 1
        self.forward(grad=self.steps % 2 == 0, shape=SHAPES[self.steps // 2 % 2], seed=self.steps)

    # -- what users do --------------------------------------------------------------

    @rule(train=st.booleans())
    def switch_mode(self, train):
        for model in self.models():
            model.train(train)

    @rule(grad=st.booleans(), shape=st.sampled_from(SHAPES), seed=st.integers(0, 99))
    def forward(self, grad, shape, seed):
        if self.dropout_draws_differ(grad):
            return
        ids = self.ids(seed, *shape)

        def call(model):
            torch.manual_seed(seed)
            with torch.set_grad_enabled(grad):
                return model(ids)

        logits = self.on_each(call)
        if logits is not None:
            self.assert_same("logits", *logits)

    @rule(
        bad=st.sampled_from(["id too large", "negative id", "float ids", "1-D ids", "too long"]),
        grad=st.booleans(),
    )
    def bad_input(self, bad, grad):
        """Input the models refuse: the same error, word for word, on both,
        whatever state they are in (hooks, replaced forwards, casts...)."""
        ids = self.ids(0, *SHAPES[0])
        if bad == "id too large":
            ids[1, 2] = self.config.d_vocab
        elif bad == "negative id":
            ids[0, 1] = -1
        elif bad == "float ids":
            ids = ids.float()
        elif bad == "1-D ids":
            ids = ids[0]
        elif bad == "too long":
            if self.POSITIONAL != "standard" or self.MODEL_CLASS != "transformer":
                return  # (only learned positions end at n_ctx; others take any length)
            ids = self.ids(0, 1, self.config.n_ctx + 1)
        errors = []
        for model in self.models():
            try:
                with torch.set_grad_enabled(grad):
                    model(ids)
            except Exception as error:  # noqa: BLE001 (compared between the models)
                errors.append((type(error), str(error)))
            else:
                errors.append(None)
        assert errors[0] == errors[1], errors
        assert errors[0] is not None, f"{bad}: accepted"

    @rule(
        shape=st.sampled_from(SHAPES),
        seed=st.integers(0, 99),
        answers=st.sampled_from([slice(3, None, 4), slice(None, None, 2), slice(None)]),
    )
    def training_step(self, shape, seed, answers):
        """Forward from one seed (the same dropout masks), cross-entropy at
        the answer positions (every 4th, every 2nd, every position: the fast
        CPU backward's row-sparse products depend on it), backward, SGD."""
        if self.dropout_draws_differ(grad=True):
            return
        ids = self.ids(seed, *shape)
        targets = self.ids(seed + 1, *shape)

        def gradients(model) -> dict:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            logits = model(ids)[:, answers]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets[:, answers].reshape(-1)
            )
            loss.backward()
            return {"logits": logits.detach()} | {n: p.grad for n, p in model.named_parameters()}

        grads = self.on_each(gradients)
        if grads is None:
            return
        names = [n for n in grads[0] if n != "logits"]
        for name in names:
            got, want = grads[1][name], grads[0][name]
            assert (got is None) == (want is None), f"{name}: gradient only on one model"
            if want is not None:
                assert got.layout == want.layout and got.dtype == want.dtype, name
        self.assert_same(
            "logits", grads[0]["logits"], grads[1]["logits"], *(g["logits"] for g in grads[2:])
        )
        if self.dtype in LOW_PRECISION:
            # bf16/fp16 gradients are not judged: a forward rounded in other places
            # flips ReLUs near their kink, and then the reference's gradients or
            # the fast one's are several times further from fp64 than the
            # other's, either way round by seed
            for name in names:
                assert grads[1][name] is None or torch.isfinite(grads[1][name]).all(), name
        else:
            # a drawn input within rounding of a ReLU's kink may take the other
            # side on the fast model: then the reference's gradients with that
            # flip are the ones to match (helpers.grads_across_relu_kinks)
            want = grads_across_relu_kinks(
                self.reference,
                lambda: [gradients(self.reference)[n] for n in names],
                [grads[1][n] for n in names],
                [grads[0][n] for n in names],
                self.tolerances(grads=True),
            )
            for name, w in zip(names, want, strict=True):
                if w is not None:
                    self.assert_same(name, w, grads[1][name])
        with torch.no_grad():  # (grads[0]: the rerun with flips above replaced .grad)
            for name, p in self.reference.named_parameters():
                if grads[0][name] is not None:
                    p.sub_(grads[0][name], alpha=0.1)
        self.fast.load_state_dict(self.reference.state_dict())

    @rule(data=st.data())
    def cast(self, data):
        self.dtype = data.draw(st.sampled_from(self.CASTS))
        for model in self.models():
            model.to(self.dtype)
        # (no resync needed: both cast the same values)

    @rule(data=st.data(), requires_grad=st.booleans())
    def freeze_or_unfreeze(self, data, requires_grad):
        name = data.draw(st.sampled_from([n for n, _ in self.reference.named_parameters()]))
        for model in self.models():
            model.get_parameter(name).requires_grad_(requires_grad)

    @rule(seed=st.integers(0, 99))
    def change_weights_and_load(self, seed):
        """Weights changed in place on the reference, then loaded into the fast
        model (a checkpoint restored mid-sweep)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.reference.parameters():
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.add_(noise.to(p.device, p.dtype), alpha=0.01)
        self.fast.load_state_dict(self.reference.state_dict())

    @rule(data=st.data())
    def add_hook(self, data):
        name = data.draw(st.sampled_from([n for n, _ in self.reference.named_modules() if n]))
        for model in self.models():
            self.hooks.append(model.get_submodule(name).register_forward_hook(scale_output_hook))

    @rule()
    def remove_hooks(self):
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    @rule(data=st.data())
    def replace_a_forward(self, data):
        leaves = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)
        names = [n for n in self.called if isinstance(self.reference.get_submodule(n), leaves)]
        name = data.draw(st.sampled_from(names))
        for model in self.models():
            module = model.get_submodule(name)
            module.forward = HalvedForward(module)
        self.replaced.append(name)

    @rule()
    def restore_forwards(self):
        for name in self.replaced:
            for model in self.models():
                model.get_submodule(name).__dict__.pop("forward", None)
        self.replaced = []

    @rule(how=st.sampled_from(["deepcopy", "torch.save"]))
    def copy_models(self, how):
        """Whole-model copies; or, for torch.save, the same error on both (a
        model nnsight has wrapped holds its lambdas, which do not pickle)."""

        def copy_of(model):
            if how == "deepcopy":
                return copy.deepcopy(model)
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            return torch.load(buffer, weights_only=False)

        copies = self.on_each(copy_of)
        if copies is None:
            return
        self.reference, self.fast = copies[:2]
        self.hooks = []  # the copies hold copies of the hooks, without handles here

    @rule()
    def convert_there_and_back(self):
        """``make_reference`` and ``make_fast`` (sharing copies): each model
        through the other variant and back, options kept."""
        self.reference = make_reference(make_fast(self.reference))
        self.fast = make_fast(make_reference(self.fast), FastOptions(**self.OPTIONS))
        assert is_fast(self.fast) and not is_fast(self.reference)
        self.hooks = []  # (as copy_models)

    @rule(dropout=st.sampled_from([0.0, 0.1]), eps=st.sampled_from([1e-5, 1e-3]))
    def change_dropout_and_eps(self, dropout, eps):
        """Set on every module after building, as a user sweeping them would."""
        self.dropout = dropout
        for model in self.models():
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = dropout
                elif isinstance(module, torch.nn.MultiheadAttention):
                    module.dropout = dropout
                elif isinstance(module, torch.nn.LayerNorm):
                    module.eps = eps
                elif isinstance(module, torch.nn.RNNBase):  # between its layers
                    module.dropout = dropout

    @precondition(lambda self: self.AUTOCAST and self.dtype == torch.float32)
    @rule(seed=st.integers(0, 99))
    def autocast_forward(self, seed):
        """Under bf16 autocast: judged against fp64, as bf16 models are (the
        two autocast runs differ by a few bf16 steps of the logits' scale)."""
        if self.dropout > 0 and self.reference.training:
            return  # (the fp64 judge would draw other masks)
        ids = self.ids(seed, *SHAPES[0])

        def call(model):
            with torch.autocast(self.DEVICE, dtype=torch.bfloat16):
                return model(ids)

        logits = self.on_each(call)
        try:
            exact = copy.deepcopy(self.reference).double()(ids)
        except (RuntimeError, ValueError):  # a dtype mismatch
            return  # (a copy that runs the original's forward: see on_each)
        if logits is not None:
            self.assert_same("logits", *logits, exact)

    @precondition(lambda self: HAS_NNSIGHT)
    @rule(data=st.data(), seed=st.integers(0, 99))
    def ablate_through_nnsight(self, data, seed):
        """Zero one module's output (its first tensor, for tuples) in an
        nnsight trace: the same logits, or the same error (a forward replaced
        after nnsight wrapped the module bypasses nnsight on both)."""
        from wmfast.interp import NNsight

        if self.dropout_draws_differ(grad=True):
            return
        name = data.draw(st.sampled_from(self.called))
        ids = self.ids(seed, *SHAPES[0])

        def ablated(model):
            torch.manual_seed(seed)
            return trace_ablation(NNsight(model), name, ids)

        logits = self.on_each(ablated)
        if logits is not None:
            self.assert_same("logits", *logits)

    @precondition(lambda self: HAS_NNSIGHT)
    @rule(data=st.data(), seed=st.integers(0, 99))
    def gradient_through_nnsight(self, data, seed):
        """Read one module output's gradient (``.grad`` in a trace) of a
        weighted sum of the logits: the same gradient, or the same error
        (e.g. nothing upstream requires grad once all is frozen)."""
        from wmfast.interp import NNsight

        if self.dropout_draws_differ(grad=True):
            return
        # (rotary_qk's (cos, sin) tables depend on the positions alone: no
        # gradient reaches them, on the reference either)
        paths = [
            p for p in self.called if not (p == "pos_encoder" and self.POSITIONAL == "rotary_qk")
        ]
        name = data.draw(st.sampled_from(paths))
        ids = self.ids(seed, *SHAPES[0])
        weight = torch.randn(
            (*SHAPES[0], self.config.d_vocab), generator=torch.Generator().manual_seed(seed)
        ).to(self.DEVICE, self.dtype)

        def gradient(model):
            torch.manual_seed(seed)
            return grad_at(NNsight(model), name, ids, weight)

        grads = self.on_each(gradient)
        if grads is None:
            return
        reference, fast = grads[:2]
        assert fast.dtype == reference.dtype and fast.shape == reference.shape, name
        if self.dtype in LOW_PRECISION:  # (not judged: see training_step)
            assert torch.isfinite(fast).all(), name
            return
        [want] = grads_across_relu_kinks(
            self.reference,
            lambda: [gradient(self.reference)],
            [fast],
            [reference],
            self.tolerances(grads=True),
        )
        self.assert_same(f"{name}.grad", want, fast)

    def teardown(self):
        for handle in getattr(self, "hooks", []):
            handle.remove()


KERNEL_CASTS = dict(CASTS=(torch.float32, torch.bfloat16, torch.float16))


def machine(
    model_class: str, positional: str | None = None, device: str = "cpu", **options
) -> type:
    """A ReferenceAndFast for one model on ``device`` (and FastOptions)."""
    compiled = options.get("compile") != "never" and model_class == "transformer"
    named_kernels = tuple(k for k in ("rotary", "norm") if options.get(k) == "triton")
    return type(
        f"ReferenceAndFast_{model_class}_{positional}_{device}",
        (ReferenceAndFast,),
        dict(
            MODEL_CLASS=model_class,
            POSITIONAL=positional,
            DEVICE=device,
            OPTIONS=options,
            COMPILED=compiled,
            NAMED_KERNELS=named_kernels,
            # compiled: fp32 only, no autocast (each a graph more: CI compiles cold)
            **(dict(CASTS=(torch.float32,), AUTOCAST=False) if compiled else {}),
            # the kernels named: no fp64, which they refuse (test_fast has that error)
            **(KERNEL_CASTS if named_kernels else {}),
        ),
    )


MACHINES = {
    # compile="never" for most: the CPU training call is uncompiled anyway,
    # and the draws then pay no compile; one model runs its compiled no-grad
    # forward (the CPU's one compiled call) among the same operations
    "standard": machine("transformer", "standard", compile="never"),
    "rotary": machine("transformer", "rotary", compile="never"),
    "rotary_qk": machine("transformer", "rotary_qk", compile="never"),
    "no positions": machine("transformer", None, compile="never"),
    "rotary_qk compiled": machine("transformer", "rotary_qk"),
    "rnn": machine("rnn"),
    "lstm": machine("lstm"),
    # the Triton kernels' eager path (their autograd Functions, the packed
    # gradient, the in-place rotation of no-grad calls) as CUDA runs it
    # uncompiled: here under the interpreter (tests/conftest.py), on CUDA below
    "rotary_qk triton": machine("transformer", "rotary_qk", compile="never", rotary="triton"),
    "rotary triton": machine("transformer", "rotary", compile="never", rotary="triton"),
    # the dropout + add + LayerNorm kernels (at d_mlp 0 both of a layer's in one)
    "standard norm triton": machine("transformer", "standard", compile="never", norm="triton"),
}

# On CUDA, uncompiled: the Triton rotary kernels and their autograd Functions,
# SDPA's CUDA kernels and cuDNN's recurrences among the same operations,
# with no compile to pay in a GPU session's minutes. Train-mode calls with
# dropout are not compared there (dropout_draws_differ).
# (rotary="auto" takes the kernels on CUDA: the rotary machines need no twin)
CUDA_MACHINES = {
    name: machine(m.MODEL_CLASS, m.POSITIONAL, device="cuda", **{**m.OPTIONS, "compile": "never"})
    for name, m in MACHINES.items()
    if not m.COMPILED and "rotary" not in m.NAMED_KERNELS
}


# not shrunk: a replay builds two models, and shrinking one failure took a
# minute per machine; a failure prints its steps (20 at most) as drawn
SETTINGS = settings(stateful_step_count=20, phases=[Phase.explicit, Phase.reuse, Phase.generate])


def marks_of(name: str) -> list:
    named = MACHINES[name].NAMED_KERNELS
    marks = [pytest.mark.triton] if named else []
    # (the norm kernels' backward loops at run time: conftest.py's triton_loops)
    return marks + ([pytest.mark.triton_loops] if "norm" in named else [])


# (the machine replaces forwards on modules that nnsight has wrapped, on purpose)
@pytest.mark.filterwarnings("ignore:.*was replaced after nnsight wrapped:UserWarning")
@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=marks_of(name)) for name in MACHINES],
)
def test_user_operations_in_any_order_keep_fast_equal_to_reference(name, monkeypatch):
    # the RNN/LSTM's row-sparse output layer and the transformers' fused ReLU
    # MLP, below the sizes they pay from (tests/conftest.py lifts the others)
    monkeypatch.setattr(output_layer_eager, "MIN_PRODUCTS", 0)
    monkeypatch.setattr(mlp_eager, "MIN_FUSED_HIDDEN", 0)
    chosen = SETTINGS
    if MACHINES[name].NAMED_KERNELS:
        # the interpreter runs each kernel program in Python: a quarter of
        # the examples (in CI's profile 2, ~30 s for the three machines)
        chosen = settings(SETTINGS, max_examples=max(2, SETTINGS.max_examples // 4))
    run_state_machine_as_test(MACHINES[name], settings=chosen)


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:.*was replaced after nnsight wrapped:UserWarning")
@pytest.mark.parametrize("name", CUDA_MACHINES)
def test_user_operations_in_any_order_keep_fast_equal_to_reference_on_cuda(name):
    run_state_machine_as_test(CUDA_MACHINES[name], settings=SETTINGS)
