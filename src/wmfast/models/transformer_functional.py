"""The Transformer's forward as one function of its weights.

This is what the fast variant runs (compiled where the rules in
wmfast.backends say so) when no nnsight trace is active. It computes exactly
what TransformerModel's module path computes (tests hold the two to the spec's
tolerances), but calls no submodule: torch.compile then sees plain tensor
code, and the graph depends only on shapes and the constants in ``Statics``,
not on which model instance passed its weights in, so one compiled graph
serves every model of the same shape in a process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import parametrize

from wmfast import functional as WF
from wmfast.models.attention import QKRotary, RotarySelfAttention
from wmfast.models.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbeddingRotation,
    RotaryQKTables,
)
from wmfast.models.transformer import RotaryEncoderLayer, RotaryTransformerEncoder
from wmfast.ops.mlp_eager import relu_mlp


class LayerWeights(NamedTuple):
    in_proj_weight: torch.Tensor
    in_proj_bias: torch.Tensor
    out_proj_weight: torch.Tensor
    out_proj_bias: torch.Tensor
    linear1_weight: torch.Tensor
    linear1_bias: torch.Tensor
    linear2_weight: torch.Tensor
    linear2_bias: torch.Tensor
    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor


class TransformerWeights(NamedTuple):
    embedding: torch.Tensor
    positional: torch.Tensor | None  # pos_embedding.weight ("standard") or inv_freq (rotary types)
    layers: tuple[LayerWeights, ...]
    output_weight: torch.Tensor
    output_bias: torch.Tensor


class Statics(NamedTuple):
    """Everything besides tensors that the forward depends on (plain constants)."""

    d_model: int
    n_heads: int
    positional: str | None
    act_fn: str
    dropout: float
    eps: float
    training: bool


def gather_weights(model) -> TransformerWeights:
    """The model's current tensors, read fresh on every call (never cached: a
    load_state_dict or an assignment of a new Parameter must take effect).

    Reads the modules' ``_modules``/``_parameters`` dicts rather than going
    through nn.Module.__getattr__ per name: 14 us instead of 70 per call for
    two layers, which a launch-bound step pays every time."""
    modules = model._modules
    kind = model.positional_embedding_type
    pos = model.pos_encoder  # None is a plain attribute, not in _modules
    if kind == "standard":
        positional = _tensor(pos._modules["pos_embedding"], "weight")
    else:
        positional = pos.inv_freq if pos is not None else None
    layers = []
    for layer in _encoder_layers(model):
        parts = layer._modules
        attn = parts["self_attn"]
        out_proj, linear1, linear2 = attn._modules["out_proj"], parts["linear1"], parts["linear2"]
        norm1, norm2 = parts["norm1"], parts["norm2"]
        layers.append(
            LayerWeights(
                _tensor(attn, "in_proj_weight"),
                _tensor(attn, "in_proj_bias"),
                _tensor(out_proj, "weight"),
                _tensor(out_proj, "bias"),
                _tensor(linear1, "weight"),
                _tensor(linear1, "bias"),
                _tensor(linear2, "weight"),
                _tensor(linear2, "bias"),
                _tensor(norm1, "weight"),
                _tensor(norm1, "bias"),
                _tensor(norm2, "weight"),
                _tensor(norm2, "bias"),
            )
        )
    output = modules["output_layer"]
    return TransformerWeights(
        _tensor(modules["embedding"], "weight"),
        positional,
        tuple(layers),
        _tensor(output, "weight"),
        _tensor(output, "bias"),
    )


def _tensor(module, name: str):
    """``getattr(module, name)``, fast for a registered parameter; anything else
    (a parametrization's property, a plain tensor attribute) by getattr."""
    found = module._parameters.get(name)
    return found if found is not None else getattr(module, name)


def _encoder_layers(model):
    """The encoder layers, read from the ``_modules`` dicts (see gather_weights)."""
    return model._modules["transformer_encoder"]._modules["layers"]._modules.values()


def statics_of(model) -> Statics:
    # through _modules, as gather_weights (7.5 us -> 2 us per call); the first
    # layer's constants are every layer's where fast_path_mismatch found none
    first = next(iter(_encoder_layers(model)))._modules
    return Statics(
        d_model=model.d_model,
        n_heads=first["self_attn"].num_heads,
        positional=model.positional_embedding_type,
        act_fn=model.config.act_fn,
        dropout=float(first["dropout"].p),
        eps=float(first["norm1"].eps),
        training=model.training,
    )


# what transformer_forward computes, per positional type: these exact classes
# (a subclass may override forward), with the constants of Statics in every layer
_POS_ENCODERS = {
    None: type(None),
    "standard": LearnedPositionalEmbedding,
    "rotary": RotaryEmbeddingRotation,
    "rotary_qk": RotaryQKTables,
}
_LAYER_PARTS = {
    "linear1": nn.Linear,
    "linear2": nn.Linear,
    "norm1": nn.LayerNorm,
    "norm2": nn.LayerNorm,
    "dropout": nn.Dropout,
    "dropout1": nn.Dropout,
    "dropout2": nn.Dropout,
}
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _is(module, cls) -> bool:
    """``module`` is a ``cls`` exactly, or the subclass torch.nn.utils.parametrize
    makes of it (which changes how its weights read, not its forward; the fast
    path reads them through getattr too)."""
    kind = type(module)
    return kind is cls or (kind.__bases__ == (cls,) and parametrize.is_parametrized(module))


def _weight_or_bias_is_none(module) -> bool:
    """Whether ``module``'s weight or bias is registered as None
    (``linear2.bias = None``, a LayerNorm without elementwise_affine): the fast
    path takes every weight as a tensor (d_mlp 0's bias-only block, the Triton
    add & norms). A parametrized weight is not in ``_parameters``. (``is None``
    on each: ``None in params.values()`` compares tensors with ``==``, 20 us.)"""
    params = module._parameters
    return params.get("weight", 0) is None or params.get("bias", 0) is None


def fast_path_mismatch(model) -> str | None:
    """Why transformer_forward would not compute what ``model``'s module tree
    computes, or None when it does.

    The module path honours whatever a user changed after building: a
    replaced activation or submodule, one Dropout's p, one LayerNorm's eps.
    transformer_forward computes the layer classes' own math with one set of
    constants (``statics_of`` reads them from the first layer), so the fast
    runner checks this on every call (~9 us for two layers) and takes the
    module path where it finds a difference, rather than compute another
    function."""
    kind = model.positional_embedding_type
    rotary_qk = kind == "rotary_qk"
    modules = model._modules  # (no pos_encoder module: None, a plain attribute)
    if type(modules.get("pos_encoder")) is not _POS_ENCODERS[kind]:
        return f"pos_encoder is a {type(modules.get('pos_encoder')).__name__}"
    emb, output = modules["embedding"], modules["output_layer"]
    if not (_is(emb, nn.Embedding) and _is(output, nn.Linear)):
        return "embedding or output_layer was replaced"
    if _weight_or_bias_is_none(output):
        return "output_layer's weight or bias is None"
    if emb.padding_idx is not None or emb.max_norm is not None or emb.scale_grad_by_freq:
        return "embedding has padding_idx, max_norm or scale_grad_by_freq set"
    if emb.sparse:  # the same values; the weight's gradient a sparse tensor (SparseAdam)
        return "embedding has sparse set"
    encoder = modules["transformer_encoder"]
    if type(encoder) is not (RotaryTransformerEncoder if rotary_qk else nn.TransformerEncoder):
        return f"transformer_encoder is a {type(encoder).__name__}"
    if encoder.norm is not None:
        return "transformer_encoder has a final norm"
    first = None
    for i, layer in enumerate(_encoder_layers(model)):
        path = f"transformer_encoder.layers.{i}"
        if type(layer) is not (RotaryEncoderLayer if rotary_qk else nn.TransformerEncoderLayer):
            return f"{path} is a {type(layer).__name__}"
        parts = layer._modules
        for name, cls in _LAYER_PARTS.items():
            if not _is(parts[name], cls):
                return f"{path}.{name} is a {type(parts[name]).__name__}"
        attn = parts["self_attn"]
        if not _is(attn, RotarySelfAttention if rotary_qk else nn.MultiheadAttention):
            return f"{path}.self_attn is a {type(attn).__name__}"
        if not _is(attn._modules["out_proj"], NonDynamicallyQuantizableLinear):
            return f"{path}.self_attn.out_proj is a {type(attn._modules['out_proj']).__name__}"
        if attn._parameters.get("in_proj_bias", 0) is None:
            return f"{path}.self_attn.in_proj_bias is None"
        for name, module in (
            ("linear1", parts["linear1"]),
            ("linear2", parts["linear2"]),
            ("norm1", parts["norm1"]),
            ("norm2", parts["norm2"]),
            ("self_attn.out_proj", attn._modules["out_proj"]),
        ):
            if _weight_or_bias_is_none(module):
                return f"{path}.{name}'s weight or bias is None"
        if rotary_qk and type(attn._modules["rotary"]) is not QKRotary:
            return f"{path}.self_attn.rotary is a {type(attn._modules['rotary']).__name__}"
        if layer.activation is not _ACTIVATIONS[model.config.act_fn]:
            return f"{path}.activation is {layer.activation!r}, not {model.config.act_fn}"
        if layer.norm_first:
            return f"{path}.norm_first is True"
        drop, drop1, drop2 = parts["dropout"], parts["dropout1"], parts["dropout2"]
        mode = model.training
        if not (
            attn.training is mode and drop.training is drop1.training is drop2.training is mode
        ):
            return f"{path} has a dropout in another train/eval mode than the model"
        constants = (
            attn.num_heads,
            *{attn.dropout, drop.p, drop1.p, drop2.p},  # one value, if all agree
            *{parts["norm1"].eps, parts["norm2"].eps},
        )
        first = first or constants
        if len(constants) != 3 or constants != first:
            return f"{path}'s heads, dropout p or LayerNorm eps differ from the model's others"
    return None


RotateQK = Callable[..., tuple[torch.Tensor, torch.Tensor]]
RotateQKInPlace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
RotatedQKV = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
RotatePackedQKV = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
EmbedRotary = Callable[..., torch.Tensor]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
Tail = Callable[..., torch.Tensor | None]
AddNorm = Callable[..., tuple[torch.Tensor, torch.Tensor]]
AddNormsAroundBias = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _torch_embedding_rotation(emb, cos, sin, scale):
    """The reference's steps: scale, then x + rotation(x)."""
    x = emb * scale
    return x + WF.rotate_pairs(x, cos, sin)


def _torch_rotary_qk(q, k, cos, sin):
    return WF.rotary_qk(q, k, cos, sin)


def torch_add_norm(x, y, weight, bias, eps, p, training, low_dtype=None):
    """The reference's steps after a block: ``layer_norm(x + dropout(y))``.

    Returns ``(out, out)``: the second is what the next matrix products take,
    which wmfast.ops.layer_norm's fused kernel also writes in ``low_dtype``
    (autocast's dtype) in the same pass; here autocast casts it in the
    products themselves, as on the reference."""
    out = F.layer_norm(x + F.dropout(y, p, training), (x.shape[-1],), weight, bias, eps)
    return out, out


def bias_only_ffn(x, linear1_weight, linear1_bias, linear2_weight, linear2_bias):
    """The feed-forward block ``linear2(dropout(act(linear1(x))))`` at d_mlp 0:
    linear2's bias at every position, exactly (a sum over no hidden units is 0).

    workingmem's default (d_mlp 0, the SIR model). The composition runs
    matrix products with an empty inner dimension, which still write their
    outputs whole: the bias copied into a (B, T, d) tensor forward, zeros for
    linear1's input gradient backward, each read again by the next kernel
    (on an H100 at the SIR shape, most likely the three ~0.15 ms elementwise
    kernels per step of bench/results' profile). Here the bias is broadcast,
    which torch.compile folds into its add & norm kernel; the values are the
    same bit for bit, in the dtype the linear gives (autocast's, when on).
    """
    bias = bias_only_ffn_row(linear1_weight, linear1_bias, linear2_weight, linear2_bias)
    return bias.expand(*x.shape[:-1], bias.shape[0])


def bias_only_ffn_row(linear1_weight, linear1_bias, linear2_weight, linear2_bias):
    """The (d,) row that bias_only_ffn broadcasts over the positions."""
    # the empty weights still get their (empty) gradients, as on the
    # reference, through a zero subtracted from the bias: b - 0.0 == b bit for
    # bit, -0.0 included, and its backward sums only the d_model bias entries
    zero = linear1_weight.sum() + linear1_bias.sum() + linear2_weight.sum()
    bias = linear2_bias - zero
    device = bias.device.type
    if torch.is_autocast_enabled(device):
        bias = bias.to(torch.get_autocast_dtype(device))
    return bias


def transformer_forward(
    weights: TransformerWeights,
    input_ids: torch.Tensor,
    statics: Statics,
    rotate_qk: RotateQK = _torch_rotary_qk,
    embed_rotary: EmbedRotary = _torch_embedding_rotation,
    attend: Attend | None = None,
    record: Callable[[str, object], None] | None = None,
    rotate_qk_in_place: RotateQKInPlace | None = None,
    rotated_qkv: RotatedQKV | None = None,
    tail: Tail | None = None,
    add_norm: AddNorm = torch_add_norm,
    add_norms_around_bias: AddNormsAroundBias | None = None,
    rotate_packed_qkv: RotatePackedQKV | None = None,
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """logits (B, T, d_vocab) for input_ids (B, T); see TransformerModel.forward.

    ``record(path, value)``, if given, receives intermediate activations under
    the module paths whose outputs they equal on the reference (wmfast check
    uses it to name the first diverging path); never passed to compiled calls.
    ``rotate_qk_in_place(qkv, cos, sin)``, if given, rotates q and k where they
    lie in the packed projection in uncompiled calls with grad disabled:
    nothing needs the unrotated values then, so no new q/k tensors are
    allocated. Compiled calls leave buffer reuse to Inductor's memory planning
    and take the out-of-place op, the plainer case for its functionalization.
    ``rotated_qkv(x, in_proj_weight, in_proj_bias, n_heads, cos, sin)``, if
    given, replaces the in-projection and the rotation together: it returns
    (q, k, v) with q and k rotated, possibly with each head's features in
    another order shared by q and k (wmfast.ops.rotary_eager), which attention
    cannot see; with ``record`` the order matters, so it is not used then.
    ``tail(q, k, v, x, layer_weights, output_weight, output_bias, eps,
    act_fn)``, if given, computes the logits from the last layer's causal
    attention on (SDPA's CPU kernels, in place of ``attend``), or returns None
    to leave that to the composition (wmfast.ops.tail_eager); not used with
    ``record``. In training with dropout it also takes ``dropout`` (p),
    ``attend`` and ``time_major_dropout1``, and draws the layer's masks
    itself, in the reference's order.
    ``add_norm(x, y, weight, bias, eps, p, training, low_dtype)`` computes
    ``layer_norm(x + dropout(y))`` after each block and returns it twice: for
    the residual stream and for the next matrix products, in
    ``low_dtype`` (autocast's dtype, or None) where it writes that copy itself
    (wmfast.ops.layer_norm); see ``torch_add_norm``.
    ``rotate_packed_qkv(qkv, cos, sin)``, if given, replaces the split of the
    packed projection and ``rotate_qk`` where that runs: (q, k, v) with q and
    k rotated, whose backward writes the projection's gradient whole
    (wmfast.ops.rotary.rotary_qkv_packed).
    ``add_norms_around_bias(x, y, norm1_weight, norm1_bias, ffn_bias,
    norm2_weight, norm2_bias, eps, p, training, low_dtype)``, if given, computes
    both add & norms of a layer at d_mlp 0 at once, around the bias-only
    feed-forward block (wmfast.ops.bias_ffn_norms); not with ``record``.
    ``rope_tables``, if given, are the rotary types' (cos, sin) tables for
    positions 0..T-1 (``WF.rotary_tables``), computed by the caller outside a
    compiled call; see FastRunner._rope_tables.
    """
    from wmfast.attention_backends import sdpa_causal

    attend = attend or sdpa_causal
    note = record or _ignore
    d_model, heads = statics.d_model, statics.n_heads
    batch, seq_len = input_ids.shape
    scale = math.sqrt(d_model)
    emb = F.embedding(input_ids, weights.embedding)  # (B, T, d)
    note("embedding", emb)

    rope = None
    if statics.positional == "standard":
        x = emb * scale + weights.positional[:seq_len]  # rows 0..T-1, broadcast over B
    elif statics.positional == "rotary":
        cos, sin = rope_tables or WF.rotary_tables(seq_len, weights.positional)  # (T, d/2)
        x = embed_rotary(emb, cos, sin, scale)
    else:
        x = emb * scale
        if statics.positional == "rotary_qk":
            # (T, head_dim/2) each
            rope = rope_tables or WF.rotary_tables(seq_len, weights.positional)

    act = F.relu if statics.act_fn == "relu" else F.gelu
    p, train = statics.dropout, statics.training
    dropping = train and p > 0
    in_place = (
        rotate_qk_in_place is not None
        and record is None
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )
    # the feed-forward block with an in-place ReLU (wmfast.ops.mlp_eager) where
    # nothing needs linear1's own output: no record, no dropout between the two
    fuse_mlp = statics.act_fn == "relu" and record is None and not dropping
    reordered_qk = rope is not None and rotated_qkv is not None and record is None
    use_tail = tail is not None and record is None
    # nn.MultiheadAttention's output lies in memory as (T, B, d): see
    # _dropout_in_time_major_order (compiled code draws from its own stream)
    mha_layout = (
        dropping and statics.positional != "rotary_qk" and not torch.compiler.is_compiling()
    )
    device = input_ids.device.type
    low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    x_in = x  # what the matrix products take: x, or add_norm's copy of it in `low`
    last = len(weights.layers) - 1
    for i, w in enumerate(weights.layers):
        path = f"transformer_encoder.layers.{i}"
        if reordered_qk:
            q, k, v = rotated_qkv(x_in, w.in_proj_weight, w.in_proj_bias, heads, *rope)
        else:
            qkv = F.linear(x_in, w.in_proj_weight, w.in_proj_bias)
            qkv = qkv.view(batch, seq_len, 3, heads, -1)
            if rope is not None and in_place:
                rotate_qk_in_place(qkv, *rope)
            if rope is not None and not in_place and rotate_packed_qkv is not None:
                q, k, v = rotate_packed_qkv(qkv, *rope)  # v: a view, as below
                note(f"{path}.self_attn.rotary", (q, k))
            else:
                q, k, v = qkv.unbind(2)  # (B, T, H, D) views
                if rope is not None and not in_place:
                    q, k = rotate_qk(q, k, *rope)
                    note(f"{path}.self_attn.rotary", (q, k))
        if use_tail and i == last:
            args = (weights.output_weight, weights.output_bias, statics.eps, statics.act_fn)
            dropout = p if dropping else 0.0
            logits = tail(q, k, v, x, w, *args, dropout, attend, time_major_dropout1=mha_layout)
            if logits is not None:
                return logits
        attn = attend(q, k, v, p if train else 0.0).reshape(batch, seq_len, d_model)
        sa = F.linear(attn, w.out_proj_weight, w.out_proj_bias)
        note(f"{path}.self_attn", sa)
        # post-LN, as nn.TransformerEncoderLayer(norm_first=False)
        drop1 = train
        if mha_layout:
            sa, drop1 = _dropout_in_time_major_order(sa, p), False
        bias_only = w.linear1_weight.shape[0] == 0 and record is None  # d_mlp 0
        mlp = (w.linear1_weight, w.linear1_bias, w.linear2_weight, w.linear2_bias)
        if bias_only and add_norms_around_bias is not None and not mha_layout:
            # the whole rest of the layer in one pass (nothing to record)
            norms = (w.norm1_weight, w.norm1_bias, bias_only_ffn_row(*mlp))
            norms += (w.norm2_weight, w.norm2_bias, statics.eps, p, train, low)
            x, x_in = add_norms_around_bias(x, sa, *norms)
            continue
        # (at d_mlp 0 no product reads norm1's output: no low copy to write)
        low1 = None if bias_only else low
        x, x_in = add_norm(x, sa, w.norm1_weight, w.norm1_bias, statics.eps, p, drop1, low1)
        note(f"{path}.norm1", x)
        if bias_only:
            ff = bias_only_ffn(x, *mlp)
        elif fuse_mlp:
            ff = relu_mlp(x_in, *mlp)
        else:
            pre = F.linear(x_in, w.linear1_weight, w.linear1_bias)
            note(f"{path}.linear1", pre)
            ff = F.linear(F.dropout(act(pre), p, train), w.linear2_weight, w.linear2_bias)
        note(f"{path}.linear2", ff)
        x, x_in = add_norm(x, ff, w.norm2_weight, w.norm2_bias, statics.eps, p, train, low)
        note(f"{path}.norm2", x)
        note(path, x)
    note("transformer_encoder", x)
    logits = F.linear(x_in, weights.output_weight, weights.output_bias)
    note("output_layer", logits)
    return logits


def _dropout_in_time_major_order(sa: torch.Tensor, p: float) -> torch.Tensor:
    """dropout1 of the stock encoder layer, with the reference's masks.

    nn.MultiheadAttention(batch_first=True) computes in (T, B, d) and returns
    a transposed view, and F.dropout on the CPU fills its mask in the input's
    memory order; so the reference's dropout1 gives draw t * B + b to position
    (b, t). Dropping out a (T, B, d) copy hands out the draws the same way,
    and CPU training with dropout then draws the reference's masks (same seed,
    same masks), not only masks from the same distribution."""
    time_major = sa.transpose(0, 1).contiguous()  # (T, B, d)
    return F.dropout(time_major, p, True).transpose(0, 1)


def _ignore(path: str, value: object) -> None:
    pass
