"""The fast variant: the reference module tree plus a runner that computes the
same function faster when no nnsight trace is active.

A fast model IS a reference model (same classes, same ``named_modules()``
paths, same state_dict keys) with two differences:

* ``model._fast`` holds a ``FastRunner``. The root forward checks its input;
  during an nnsight trace it then takes the module path itself, as the
  reference does, so every documented submodule is called and
  ``.output``/``.input``/edits/``.grad``/``.source`` work as on the
  reference. Otherwise it hands the call to the runner, which, unless hooks
  are registered in the model, runs ``transformer_forward`` (one function of
  the weights; compiled where wmfast.backends' rules say so).
* Its rotary modules (``pos_encoder`` of "rotary", ``self_attn.rotary`` of
  "rotary_qk") use the Triton kernels where the rules pick them, also on the
  traced path.

RNN/LSTM: the recurrence stays on cuDNN (torch.compile does not compile it and
is slower when forced), so on CUDA, and without grad anywhere, their fast
variant runs the module path: the reference's speed, by design. On the CPU
the RNN's training call takes wmfast.ops.rnn_eager, ATen's own forward with
the backward through time written out; the LSTM's stays on oneDNN's fused
layer; both run their output layer's backward on the rows the loss reads
(wmfast.ops.output_layer_eager; wmfast.backends, "recurrence" and
"output_layer").
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from wmfast import backends
from wmfast import functional as WF
from wmfast.attention_backends import CAUSAL_ATTENTION
from wmfast.interp import HOOKS, why_submodules_must_run
from wmfast.models.base import WorkingMemoryModel
from wmfast.models.recurrent import LSTMModel, RNNCore, RNNModel
from wmfast.models.transformer import TransformerModel
from wmfast.models.transformer_functional import (
    Statics,
    TransformerWeights,
    _is,
    _tensor,
    _torch_embedding_rotation,
    _weight_or_bias_is_none,
    fast_path_mismatch,
    gather_weights,
    statics_of,
    torch_add_norm,
    transformer_forward,
)
from wmfast.ops import output_layer_eager, rnn_eager, rotary_eager, tail_eager

logger = logging.getLogger("wmfast")

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class FastOptions:
    """How a fast model computes (never what: every choice gives the same function).

    compile:   "auto" (the device rule in wmfast.backends), "always" or "never".
    mode:      torch.compile mode; "reduce-overhead" uses CUDA graphs (each call
               then overwrites the previous call's output: clone what you keep).
    dynamic:   None: torch.compile's default (a second sequence length recompiles
               once, as dynamic); True: one graph for every batch size and
               sequence length from the start; False: one graph per shape.
               Either way length 1 gets a graph of its own: PyTorch
               specializes sizes 0 and 1.
    rotary:    "auto", "triton" or "torch" (see wmfast.backends).
    attention: "auto", "sdpa" or "flash_attn".
    norm:      "auto", "torch" or "triton": the add & norm after each block.
    """

    compile: str = "auto"
    mode: str | None = None
    dynamic: bool | None = None
    rotary: str = "auto"
    attention: str = "auto"
    norm: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("compile", backends.COMPILE_CHOICES),
            ("mode", COMPILE_MODES),
            ("dynamic", (None, True, False)),
            ("rotary", backends.ROTARY_IMPLS),
            ("attention", backends.ATTENTION_IMPLS),
            ("norm", backends.NORM_IMPLS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"FastOptions.{name} must be one of {list(allowed)}; got {getattr(self, name)!r}"
                )


class Plan(NamedTuple):
    """What one call runs: decided by the rules, never by timing."""

    compiled: bool
    rotary: str
    attention: str
    norm: str = "torch"
    recurrence: str = "none"  # RNN/LSTM: "module" or "bptt" (wmfast.backends)
    output_layer: str = "none"  # RNN/LSTM: "module" or "answer rows" (wmfast.backends)


# what a recurrent call runs where only its modules can (backends.recurrent_calls_modules)
_RECURRENT_MODULES = Plan(
    compiled=False,
    rotary="none",
    attention="none (recurrent)",
    norm="none",
    recurrence="module",
    output_layer="module",
)

# how many sequence lengths' rotary tables a runner keeps (FastRunner._rope_tables)
ROPE_TABLES_KEPT = 8

_COMPILED: dict[tuple, Callable] = {}
# the _COMPILED keys whose first call was announced in this process: another
# model of the same configuration (a seed sweep, a copy) reuses their graphs,
# so it has no compile to announce. An unpickled model in a new process
# announces again, because there it compiles
_ANNOUNCED_COMPILES: set[tuple] = set()


def _compiled_forward(mode: str | None, dynamic: bool | None, graph_key: tuple) -> Callable:
    """The compiled transformer_forward for one (mode, dynamic, graph_key).

    Models of one configuration (a seed sweep) share it: its graphs depend on
    shapes and constants, not on the model instance. Each configuration gets
    a copy of transformer_forward with a code object of its own, because
    Dynamo keeps the graphs on the code object and, past
    torch._dynamo.config.recompile_limit (8) graphs on one, runs the function
    uncompiled from then on (a warning, nothing else). A process that builds
    several configurations (a sweep over d_model, ``wmfast check``'s four
    transformers in three modes, the benchmark matrix) passed that limit with
    one shared function; now each configuration counts only its own shapes.

    dynamic=True is not passed on as torch.compile(dynamic=True), which makes
    every dimension of every weight symbolic too; duck sizing then ties a
    weight dimension to the sequence length whenever the two happen to be
    equal (inv_freq's d/2 entries and T = d/2), and the next length
    recompiles. FastRunner marks the token ids' batch and length dimensions
    dynamic instead (``_dynamic_dims``).
    """
    key = (mode, dynamic, graph_key)
    compiled = _COMPILED.get(key)  # one hash of the key per call
    if compiled is None:
        compiled = _COMPILED[key] = torch.compile(
            _with_own_code(transformer_forward),
            mode=mode,
            dynamic=False if dynamic is False else None,
        )
    return compiled


def _with_own_code(fn: Callable) -> Callable:
    """``fn`` with a fresh copy of its code object (same bytecode, same globals)."""
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
    return copy


def _graph_key(weights: TransformerWeights, statics: Statics, plan: Plan) -> tuple:
    """The configuration a call belongs to, for ``_compiled_forward``: the
    constants, the sizes the weights fix (vocabulary, layers, d_mlp, n_ctx),
    the weights' dtype, the device, the grad mode, autocast and the plan
    (which functions it passes in).

    It only groups graphs under a code object; Dynamo's own guards (on every
    weight's shape, dtype, requires_grad, ...) decide what runs, so whatever
    the key leaves out (a frozen layer) costs at most a graph more under the
    same code object. Read per call: ~3 us (a key with every weight's layout
    took ~20 us with its hashing)."""
    emb, mlp = weights.embedding, weights.layers[0].linear1_weight
    device = emb.device  # all weights share it, or no forward could run
    positional = None if weights.positional is None else weights.positional.shape
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    sizes = (emb.shape, emb.dtype, len(weights.layers), mlp.shape, positional)
    return statics, sizes, device, plan, torch.is_grad_enabled(), autocast


def _dynamic_dims(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    """An alias of ``tensor`` whose ``dims`` compile as dynamic: the token ids'
    batch and length, the rotary tables' length (an alias, so the mark does
    not follow the caller's tensor elsewhere)."""
    import torch._dynamo  # loaded by torch.compile already; named here for readers

    alias = tensor.view(tensor.shape)
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(alias, dim)  # "maybe": sizes 0 and 1 still specialize
    return alias


def _rotary_functions(impl: str) -> dict[str, Callable]:
    """transformer_forward's rotary arguments for ``impl``."""
    if impl == "triton":
        from wmfast.ops import rotary as ops  # imports triton: only when picked

        packed = ops.rotary_qkv_packed if backends.PACKED_ROTARY_QK_GRADIENT else None
        return dict(
            rotate_qk=ops.rotary_qk,
            rotate_qk_in_place=ops.rotary_qk_packed_,
            rotate_packed_qkv=packed,
            embed_rotary=ops.embedding_rotation,
        )
    return dict(rotated_qkv=rotary_eager.rotated_qkv, embed_rotary=_torch_embedding_rotation)


def _add_norm_functions(impl: str) -> dict[str, Callable | None]:
    """transformer_forward's add & norm arguments for ``impl``."""
    if impl == "triton":
        from wmfast.ops import bias_ffn_norms, layer_norm  # import triton: only when picked

        fused = bias_ffn_norms.bias_ffn_norms if backends.FUSED_NORMS_AT_D_MLP_0 else None
        return dict(add_norm=layer_norm.dropout_add_layer_norm, add_norms_around_bias=fused)
    return dict(add_norm=torch_add_norm, add_norms_around_bias=None)


def _forward_functions(plan: Plan) -> dict[str, Callable | None]:
    """transformer_forward's function arguments for ``plan``."""
    return dict(
        **_rotary_functions(plan.rotary),
        attend=CAUSAL_ATTENTION[plan.attention],
        **_add_norm_functions(plan.norm),
        # the tail calls SDPA's CPU kernels itself
        tail=tail_eager.transformer_tail if plan.attention == "sdpa" else None,
    )


def _compute_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the matrix products run in: autocast's, or the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


def _embedding_weight(model: nn.Module) -> torch.Tensor:
    # through the _modules dict (as gather_weights): the runner asks per call,
    # and model.embedding.weight through nn.Module.__getattr__ took 2 us
    return _tensor(model._modules["embedding"], "weight")


class FastRunner:
    """The fast variant's untraced forward for one model."""

    def __init__(self, options: FastOptions | None = None) -> None:
        self.options = options or FastOptions()
        self._said_module_path: set[str] = set()  # fast_path_mismatch reasons logged
        self.last_plan: Plan | None = None  # what the latest call actually ran
        # the transformers' plan and transformer_forward's function arguments
        # per call context (_setup); options are fixed for a runner's life
        self._setups: dict[tuple, tuple[Plan, dict]] = {}
        # compiled calls' rotary tables per length, with the buffer they were
        # computed from and its version (_rope_tables)
        self._rope_cache: dict[tuple, tuple] = {}

    # a copy says again why it runs its module path: it is another model
    def __getstate__(self) -> dict:
        return {"options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["options"])

    def plan(
        self, model: nn.Module, device: torch.device | None = None, grad_enabled: bool | None = None
    ) -> Plan:
        if not isinstance(model, TransformerModel):
            return self._recurrent_plan(model, device, grad_enabled)
        weight = _embedding_weight(model)
        device = device or weight.device
        grad = torch.is_grad_enabled() if grad_enabled is None else grad_enabled
        rotates = model.positional_embedding_type in ("rotary", "rotary_qk")
        if backends.plain_math_required():
            # torch.func (per-sample gradients, Jacobians), forward-mode AD:
            # the plain math only, uncompiled
            return Plan(compiled=False, rotary="torch" if rotates else "none", attention="sdpa")
        compiled = backends.resolve_compile(self.options.compile, device, grad)
        # the weights' dtype, not autocast's: the embedding rotation and the
        # residual stream stay in it under autocast
        weight_dtype = weight.dtype
        rotary = "none"
        if rotates:
            rotary = backends.resolve_rotary(
                self.options.rotary,
                device,
                weight_dtype,
                model.positional_embedding_type,
                compiled_training=compiled and grad,
            )
        return Plan(
            compiled=compiled,
            rotary=rotary,
            attention=backends.resolve_attention(
                self.options.attention, device, _compute_dtype(weight_dtype, device)
            ),
            norm=backends.resolve_norm(
                self.options.norm, device, weight_dtype, compiled_training=compiled and grad
            ),
        )

    @staticmethod
    def _recurrent_plan(
        model: nn.Module, device: torch.device | None, grad_enabled: bool | None
    ) -> Plan:
        weight = _embedding_weight(model)
        device = device or weight.device
        grad = torch.is_grad_enabled() if grad_enabled is None else grad_enabled
        # (not under torch.compile, torch.func or autocast: the plain module)
        records_grad = (
            grad
            and backends.eager_functions_allowed(device.type)
            and any(p.requires_grad for p in model.parameters())
        )
        model_class = "rnn" if isinstance(model, RNNModel) else "lstm"
        return Plan(
            compiled=False,
            rotary="none",
            attention="none (recurrent)",
            norm="none",
            recurrence=backends.resolve_recurrence(model_class, device, weight.dtype, records_grad),
            output_layer=backends.resolve_output_layer(device, records_grad),
        )

    def __call__(
        self, model: nn.Module, input_ids: torch.Tensor, record: Callable | None = None
    ) -> torch.Tensor:
        """A fast model's forward outside nnsight traces (the root forward runs
        the module path itself during one), after its input check: the own
        path, or the module path where hooks need the submodules called.
        ``record`` (see transformer_forward) forces the own path, uncompiled:
        it is for locating a divergence, not for speed."""
        if not isinstance(model, TransformerModel):
            return self._recurrent(model, input_ids)
        if record is None and (why := why_submodules_must_run(model)) is not None:
            return self._module_path(model, input_ids, why)
        mismatch = fast_path_mismatch(model)
        if mismatch is not None:
            return self._module_path(model, input_ids, mismatch)
        compiling = torch.compiler.is_compiling()
        plan, kwargs = self._setup(model, input_ids, memo=not compiling)
        if record is not None:
            plan = plan._replace(compiled=False)
        self.last_plan = plan
        args = (gather_weights(model), input_ids, statics_of(model))
        if not plan.compiled or compiling:
            # (under a user's own torch.compile of the model, that compile owns
            # compiling and shapes: it traces the plain function)
            return transformer_forward(*args, **kwargs, record=record)
        key = (self.options.mode, self.options.dynamic, _graph_key(args[0], args[2], plan))
        forward = _compiled_forward(*key)
        tables = None
        if plan.rotary != "none":  # (the plan's rotary is "none" but for the rotary types)
            tables = self._rope_tables(args[0].positional, input_ids.shape[1])
        if self.options.dynamic:
            args = (args[0], _dynamic_dims(input_ids, 0, 1), args[2])
            if tables is not None:
                tables = tuple(_dynamic_dims(table, 0) for table in tables)
        kwargs = dict(kwargs, rope_tables=tables)
        if key in _ANNOUNCED_COMPILES:
            return forward(*args, **kwargs)
        _ANNOUNCED_COMPILES.add(key)
        logger.warning(
            "wmfast: first fast call for %s (%s, %s): torch.compile may take 10-60 s now "
            "(set TORCHINDUCTOR_CACHE_DIR to reuse compiled code across processes)",
            "training" if torch.is_grad_enabled() else "inference",
            input_ids.device.type,
            _compute_dtype(_embedding_weight(model).dtype, input_ids.device),
        )
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        logger.info("wmfast: first fast call took %.1f s", time.perf_counter() - start)
        return out

    def _rope_tables(self, inv_freq: torch.Tensor, seq_len: int) -> tuple:
        """The rotary types' (cos, sin) tables for a compiled call, computed
        here, uncompiled, as the reference's pos_encoder computes them.
        Inductor's vectorised cos and sin differ from ATen's by up to an fp32
        ulp: lost in fp32's other rounding, but an fp64 model's compiled
        forward was 5e-8 to 1.2e-7 from the fp64 reference with them, against
        ~2e-15 with these.

        Kept per length (training and evaluation may alternate two) while the
        buffer is the same tensor with the same values (a device move gives a
        new one, load_state_dict writes new values in place); per inference
        mode too, as autograd cannot save an inference tensor for a backward."""
        key = (seq_len, torch.is_inference_mode_enabled())
        kept = self._rope_cache.get(key)
        if kept is not None and kept[0] is inv_freq and kept[1] == inv_freq._version:
            return kept[2]
        tables = WF.rotary_tables(seq_len, inv_freq)
        if not inv_freq.requires_grad:  # (tables with a graph serve one backward)
            if len(self._rope_cache) >= ROPE_TABLES_KEPT:
                del self._rope_cache[next(iter(self._rope_cache))]  # the oldest
            self._rope_cache[key] = (inv_freq, inv_freq._version, tables)
        return tables

    def _setup(
        self, model: nn.Module, input_ids: torch.Tensor, memo: bool = True
    ) -> tuple[Plan, dict]:
        """A transformer call's plan and transformer_forward's function
        arguments, kept per call context: every input of the rules that can
        change between one model's calls (device, grad mode, autocast,
        torch.func transforms and forward AD, the weights' dtype; and the
        positional type, fixed in practice). Worked out anew on each call
        they took ~30 us of a tiny model's ~400 us compiled forward on 2 CPU
        cores, as much as torch.compile(reference)'s whole wrapper.
        ``memo=False`` under a user's own torch.compile, which traces this."""
        device = input_ids.device
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        context = (
            device,
            torch.is_grad_enabled(),
            autocast,
            backends.plain_math_required(),
            _embedding_weight(model).dtype,
            model.positional_embedding_type,
        )
        setup = self._setups.get(context) if memo else None
        if setup is None:
            plan = self.plan(model, device)
            setup = (plan, _forward_functions(plan))
            if memo:
                self._setups[context] = setup
        return setup

    def _recurrent(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        # Cheap questions first, before the hook check and the plan:
        # most calls run the modules whatever those say, and at small sizes
        # their host time showed (2 cores, B 8, T 32, d 32: the no-grad forward
        # 0.94x of the reference, an LSTM training call 0.95x; both ~1.0x now).
        # An LSTM's own path is its modules but for the output layer's backward
        # (backends.resolve_recurrence), which below its size is F.linear's.
        if backends.recurrent_calls_modules(input_ids) or (
            isinstance(model, LSTMModel) and not _output_rows_pay(model, input_ids)
        ):
            self.last_plan = _RECURRENT_MODULES
            return model.forward_modules(input_ids)
        if (why := why_submodules_must_run(model)) is not None:
            return self._module_path(model, input_ids, why)
        plan = self.plan(model, input_ids.device)
        if plan.output_layer == "answer rows" and not _output_rows_pay(model, input_ids):
            plan = plan._replace(output_layer="module")  # what output_layer_eager runs then
        if plan.recurrence == "bptt" and input_ids.shape[1] < rnn_eager.MIN_STEPS:
            plan = plan._replace(recurrence="module")
        if plan.recurrence == plan.output_layer == "module":
            self.last_plan = plan
            return model.forward_modules(input_ids)  # cuDNN recurrence: see module docstring
        mismatch = _recurrent_path_mismatch(model, plan)
        if mismatch is not None:
            return self._module_path(model, input_ids, mismatch)
        self.last_plan = plan
        modules = model._modules
        x = modules["embedding"](input_ids)  # (B, T, d_model)
        core = modules[model.core_name]
        if plan.recurrence == "bptt":
            h = rnn_eager.rnn_forward(core._modules["rnn"], x)  # (B, T, d_hidden)
        else:
            h = core(x)
        output = modules["output_layer"]
        return output_layer_eager.output_layer(h, output.weight, output.bias)  # (B, T, d_vocab)

    def _module_path(self, model: nn.Module, input_ids: torch.Tensor, mismatch: str):
        """The reference's computation, for a module tree the fast path does not
        compute (wmfast.models.transformer_functional.fast_path_mismatch, a
        replaced forward) or whose submodules carry hooks (which are expected
        to cost speed: not logged)."""
        if mismatch != HOOKS and mismatch not in self._said_module_path:
            self._said_module_path.add(mismatch)
            logger.warning(
                "wmfast: %s, which the fast path does not compute: this fast model runs its "
                "module path (the reference's computation and speed) while that holds",
                mismatch,
            )
        transformer = isinstance(model, TransformerModel)
        self.last_plan = Plan(
            compiled=False,
            rotary="none",
            attention="none (module path)",
            norm="none",
            recurrence="none" if transformer else "module",
            output_layer="none" if transformer else "module",
        )
        return model.forward_modules(input_ids)


def _output_rows_pay(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether a recurrent model's output layer is large enough for
    output_layer_eager's row backward; True for another module than an
    nn.Linear, so that the mismatch check names it (_recurrent_path_mismatch)."""
    output = model._modules["output_layer"]
    if not isinstance(output, nn.Linear):
        return True
    return output_layer_eager.large_enough(
        input_ids.numel() * output.in_features, output.out_features
    )


def _recurrent_path_mismatch(model: nn.Module, plan: Plan) -> str | None:
    """Why the recurrent model's own path under ``plan`` would not compute what
    its modules compute (a module changed after building), or None when it
    does: the output layer must be an nn.Linear with its weight and bias
    (parametrized or not, as the transformers' check allows), and for
    "bptt" rnn_core the RNNCore around an nn.RNN that wmfast.ops.rnn_eager
    computes."""
    if plan.recurrence == plan.output_layer == "module":
        return None  # the modules themselves run
    output = model._modules["output_layer"]
    if not _is(output, nn.Linear) or _weight_or_bias_is_none(output):
        return "output_layer is not an nn.Linear with a bias"
    if plan.recurrence != "bptt":
        return None
    core = model._modules["rnn_core"]
    if type(core) is not RNNCore:
        return f"rnn_core is a {type(core).__name__}"
    mismatch = rnn_eager.unsupported(core._modules["rnn"])
    return None if mismatch is None else f"rnn_core.rnn {mismatch}"


def is_fast(model: nn.Module) -> bool:
    return getattr(model, "_fast", None) is not None


def _set_rotary_impl(model: nn.Module, impl: str) -> None:
    for module in model.modules():
        if hasattr(module, "rotary_impl"):
            module.rotary_impl = impl


def attach_fast(model: nn.Module, options: FastOptions | None = None) -> nn.Module:
    """Turn ``model`` itself into its fast variant (no copy); returns it."""
    options = options or FastOptions()
    model._fast = FastRunner(options)
    _set_rotary_impl(model, options.rotary)
    return model


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def make_fast(
    model: nn.Module, options: FastOptions | None = None, **option_fields: Any
) -> nn.Module:
    """A fast model sharing ``model``'s parameters and buffers.

    Nothing is copied: a training step on one changes the other. ``model``
    itself stays as it was (a reference model stays the reference).
    ``option_fields`` are FastOptions fields, e.g. ``make_fast(m, mode="reduce-overhead")``.
    """
    if not isinstance(model, WorkingMemoryModel):
        raise TypeError(
            f"make_fast takes a wmfast model (TransformerModel, RNNModel, LSTMModel); got "
            f"{type(model).__name__}. Load a workingmem run with wmfast.load_model(run_dir) or "
            f"ModelWrapper.from_checkpoint_dir(run_dir): they read workingmem's layout."
        )
    if options is not None and option_fields:
        raise ValueError("pass either options=FastOptions(...) or its fields, not both")
    return attach_fast(sharing_copy(model), options or FastOptions(**option_fields))


def make_reference(model: nn.Module) -> nn.Module:
    """The reference variant of a (fast) model, sharing its parameters and buffers."""
    reference = sharing_copy(model)
    reference._fast = None
    _set_rotary_impl(reference, "torch")
    return reference


def describe(model: nn.Module, device: torch.device | str | None = None) -> dict[str, Any]:
    """What a model runs, per path: the report behind the log line and ``wmfast check``."""
    if not is_fast(model):
        return {"variant": "reference"}
    runner: FastRunner = model._fast
    device = torch.device(device) if device is not None else next(model.parameters()).device
    training = runner.plan(model, device, grad_enabled=True)
    inference = runner.plan(model, device, grad_enabled=False)
    mismatch = why_submodules_must_run(model)
    if mismatch in (None, HOOKS):
        if isinstance(model, TransformerModel):
            mismatch = fast_path_mismatch(model)
        else:
            mismatch = _recurrent_path_mismatch(model, training)
    return {
        "variant": "fast",
        "device": str(device),
        "options": dataclasses.asdict(runner.options),
        # set where the module tree was changed so that the fast path would
        # compute another function (a replaced forward too): the model then
        # runs its module path
        "module_path_reason": mismatch,
        "compiled_with_grad": training.compiled,
        "compiled_no_grad": inference.compiled,
        "rotary": inference.rotary,
        "rotary_with_grad": training.rotary,
        "attention": inference.attention,
        "norm": inference.norm,
        "norm_with_grad": training.norm,
        "recurrence": inference.recurrence,
        "recurrence_with_grad": training.recurrence,
        "output_layer_with_grad": training.output_layer,
    }
