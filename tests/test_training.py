"""The wrappers' training loop: workingmem's loss and metrics, parity between
variants, resume, and robustness (interrupts, NaN, existing runs)."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmfast import ModelConfig, ModelWrapper, TrainingConfig, TransformerModelWrapper, load_model
from wmfast import training as T
from wmfast.tasks import sir
from wmfast.tasks.sir import SIRDataset

from .helpers import FP32_GRADS, small_config

TRAIN = SIRDataset(seq_len=8, n_sequences=96, seed=0)
VAL = SIRDataset(seq_len=8, n_sequences=32, seed=1)


def _config(**changes) -> ModelConfig:
    fields = dict(d_vocab=350, d_mlp=64, positional_embedding_type="rotary_qk")
    return small_config(**{**fields, **changes})


def _training(tmp_path, **changes) -> TrainingConfig:
    base = dict(epochs=2, batch_size=16, learning_rate=1e-3, checkpoint_dir=str(tmp_path), seed=0)
    return TrainingConfig(**{**base, **changes})


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loss_is_cross_entropy_at_answers_from_the_preceding_position():
    raw = next(iter(torch.utils.data.DataLoader(TRAIN, batch_size=4)))
    batch = T.prepare_batch(raw, 350, mask_answer_tokens=True)
    assert batch.positions.tolist() == [3, 7, 11, 15, 19, 23, 27, 31]
    assert torch.equal(batch.labels, raw["token_ids"][:, 3::4])  # the answer tokens
    assert set(batch.labels.unique().tolist()) <= {sir.SAME, sir.DIFF}
    assert (batch.input_ids[:, 3::4] == 0).all()  # masked to UNK in the input
    assert torch.equal(batch.input_ids[:, 0::4], raw["token_ids"][:, 0::4])
    logits = torch.randn(4, 32, 350, generator=torch.Generator().manual_seed(0))
    loss, answer_logits = T.masked_loss(logits, batch)
    want = F.cross_entropy(logits[:, 2::4].reshape(-1, 350), raw["token_ids"][:, 3::4].reshape(-1))
    torch.testing.assert_close(loss, want)
    assert answer_logits.shape == (4, 8, 350)
    unmasked = T.prepare_batch(raw, 350, mask_answer_tokens=False)
    assert torch.equal(unmasked.input_ids, raw["token_ids"])


def test_sparsity_drops_answers_from_the_loss():
    raw = next(iter(torch.utils.data.DataLoader(TRAIN, batch_size=8)))
    batch = T.prepare_batch(raw, 350, True)
    logits = torch.randn(8, 32, 350)
    full, _ = T.masked_loss(logits, batch)
    sparse, _ = T.masked_loss(
        logits, batch, sparsity=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert 0.2 * full < sparse < 0.8 * full  # about half the terms, averaged over all


def test_bad_batches_are_clear_errors():
    raw = next(iter(torch.utils.data.DataLoader(TRAIN, batch_size=2)))
    bad = {**raw, "token_ids": raw["token_ids"].clone()}
    bad["token_ids"][0, 0] = 400
    with pytest.raises(ValueError, match="token id 400 is out of range"):
        T.prepare_batch(bad, 350, True)
    shifted = {**raw, "answer_locations": raw["answer_locations"].clone()}
    shifted["answer_locations"][1] = shifted["answer_locations"][1].roll(1)
    with pytest.raises(ValueError, match="same positions"):
        T.prepare_batch(shifted, 350, True)


class _AlwaysSame(torch.nn.Module):
    """Predicts "same" everywhere: its accuracy is the share of "same" answers."""

    d_vocab = 350
    check_token_ids = True

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, 350)
        logits[..., sir.SAME] = 1.0
        return logits


def test_accuracy_skips_the_warmup_unless_asked_and_macro_accuracy_counts_whole_sequences():
    metrics = T.evaluate(_AlwaysSame(), VAL, torch.device("cpu"), batch_size=8)
    labels = torch.stack([VAL[i]["token_ids"][3::4] for i in range(len(VAL))])
    warmup = 2 * VAL.config.concurrent_reg
    assert metrics["acc"] == pytest.approx(float((labels[:, warmup:] == sir.SAME).float().mean()))
    assert metrics["macro_acc"] == pytest.approx(float((labels == sir.SAME).all(1).float().mean()))
    every = T.evaluate(_AlwaysSame(), VAL, torch.device("cpu"), batch_size=8, skip_warmup=False)
    assert every["acc"] == pytest.approx(float((labels == sir.SAME).float().mean()))
    assert every["acc"] != metrics["acc"]  # the warm-up's answers count now
    assert every["macro_acc"] == metrics["macro_acc"]


def _on_cpu(wrapper):
    """The wrapper trains on the CPU even where CUDA is present. The tests using
    it compare fp32 runs number for number; on CUDA a wrapper trains under fp16
    autocast (workingmem's default), which changes the numbers (and
    run-to-run bitwise equality on CUDA is set_deterministic's test)."""
    wrapper.device = torch.device("cpu")
    wrapper.model.to(wrapper.device)
    return wrapper


def _losses(tmp_path, variant, config=None, **training):
    wrapper = _on_cpu(ModelWrapper(config or _config(), variant=variant))
    losses = []
    wrapper.train(
        TRAIN, _training(tmp_path, **training), eval_dataset=VAL, progress=False,
        on_step=lambda step, loss: losses.append(loss),
    )  # fmt: skip
    return wrapper, losses


def test_reference_and_fast_training_give_the_same_loss_curve_and_interchangeable_checkpoints(
    tmp_path,
):
    reference, ref_losses = _losses(tmp_path / "ref", "reference", epochs=4)
    fast, fast_losses = _losses(tmp_path / "fast", "fast", epochs=4)
    assert len(ref_losses) == len(fast_losses) == 24
    # fp32 on CPU: the two paths differ by float rounding only, and it stays small
    # over 24 AdamW steps (measured: max relative difference ~1e-6)
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), **FP32_GRADS)
    assert ref_losses[-1] < ref_losses[0]  # it learned something
    ids = VAL[0]["token_ids"][None]
    as_reference = load_model(tmp_path / "fast", variant="reference").eval()
    torch.testing.assert_close(as_reference(ids), fast.model.eval()(ids), rtol=1e-5, atol=1e-5)
    as_fast = load_model(tmp_path / "ref", variant="fast").eval()
    torch.testing.assert_close(as_fast(ids), reference.model.eval()(ids), rtol=1e-5, atol=1e-5)


@given(
    model=st.sampled_from(
        ["transformer/rotary_qk", "transformer/rotary", "transformer/standard", "transformer/None"]
        + ["rnn", "lstm"]
    ),
    dropout=st.sampled_from([0.0, 0.1]),
    sparsity=st.sampled_from([0.0, 0.5]),
    freeze_embeddings=st.booleans(),
    mask_answer_tokens=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 1000),
)
def test_every_model_and_training_option_gives_the_same_run_on_both_variants(
    tmp_path_factory, model, dropout, sparsity, freeze_embeddings, mask_answer_tokens,
    weight_decay, seed,
):  # fmt: skip
    """The loss at every step and the evaluation after the run, for each
    model and the options that change what a step computes (dropout masks,
    the answers sparsity drops, frozen embeddings, unmasked answers)."""
    cls, _, pe = model.partition("/")
    fields = dict(positional_embedding_type=None if pe == "None" else pe, d_mlp=32)
    config = _config(
        model_class=cls,
        dropout=dropout,
        seed=seed,
        **(fields if cls == "transformer" else dict(act_fn="tanh" if cls == "rnn" else "relu")),
    )
    training = dict(
        sparsity=sparsity,
        freeze_embeddings=freeze_embeddings,
        mask_answer_tokens=mask_answer_tokens,
        weight_decay=weight_decay,
        seed=seed,
    )
    runs = []
    for variant in ("reference", "fast"):
        wrapper, losses = _losses(tmp_path_factory.mktemp(variant), variant, config, **training)
        metrics = wrapper.evaluate(VAL, mask_answer_tokens=mask_answer_tokens, skip_warmup=False)
        runs.append((losses, metrics))
    (ref_losses, ref_eval), (fast_losses, fast_eval) = runs
    assert len(fast_losses) == len(ref_losses) == 12
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), **FP32_GRADS)
    torch.testing.assert_close(fast_eval["loss"], ref_eval["loss"], **FP32_GRADS)
    # (every answer counted, 8 a sequence): one whose two best logits tie
    # within rounding may go either way
    assert abs(fast_eval["acc"] - ref_eval["acc"]) <= 1.5 / (len(VAL) * 8), (fast_eval, ref_eval)


@pytest.mark.cuda
def test_the_training_loop_runs_under_cuda_graphs(tmp_path):
    """With ``mode="reduce-overhead"`` torch.compile replays each call into
    memory that the next call reuses, and reading an output kept from an
    earlier call raises (README, Options): the loop, its evaluations and its
    test pass must keep no model output across calls, and give the run that
    the default fast model gives."""
    from wmfast import FastOptions

    runs = []
    for options in (None, FastOptions(mode="reduce-overhead")):
        wrapper = TransformerModelWrapper(_config(dropout=0.0), fast_options=options)
        assert wrapper.device.type == "cuda"
        losses = []
        wrapper.train(
            TRAIN, _training(tmp_path / str(len(runs)), precision="fp32"),
            eval_dataset=VAL, test_dataset=VAL, progress=False,
            on_step=lambda step, loss, losses=losses: losses.append(loss),
        )  # fmt: skip
        runs.append((losses, wrapper.evaluate(VAL, return_predictions=True)))
    (losses, metrics), (graph_losses, graph_metrics) = runs
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(losses), **FP32_GRADS)
    torch.testing.assert_close(graph_metrics["loss"], metrics["loss"], **FP32_GRADS)


def test_cpu_reruns_are_bitwise_equal(tmp_path):
    a, losses_a = _losses(tmp_path / "a", "fast")
    b, losses_b = _losses(tmp_path / "b", "fast")
    assert losses_a == losses_b
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checkpoints_history_and_best_model(tmp_path):
    wrapper = TransformerModelWrapper(_config())
    entry = wrapper.train(
        TRAIN,
        _training(tmp_path, save_strategy="epoch", save_steps=1),
        eval_dataset=VAL,
        test_dataset=VAL,
        progress=False,
    )
    files = {p.name for p in tmp_path.iterdir()}
    assert {"best_model.pth", "config.yaml", "wmfast.yaml", "history.yaml", "checkpoints"} <= files
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {
        "epoch_0.pth",
        "epoch_1.pth",
        "resume.pt",
    }
    assert entry["epoch"] == 1 and 0 <= entry["eval_acc"] <= 1 and entry["test_acc"] is not None
    loaded = TransformerModelWrapper.from_checkpoint_dir(tmp_path)
    assert loaded.history[-1]["test_acc"] == entry["test_acc"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("exc", [_Stop, KeyboardInterrupt])
def test_an_interrupted_run_leaves_the_last_good_checkpoint(tmp_path, exc):
    wrapper = TransformerModelWrapper(_config())
    config = _training(tmp_path, epochs=3)

    saved = {}

    def interrupt(step, loss):
        if step == 7:  # first step of epoch 1: epoch 0 has saved its best model
            saved["best"] = _digest(tmp_path / "best_model.pth")
        if step == 8:  # mid-epoch 1
            raise exc()

    with pytest.raises(exc):
        wrapper.train(TRAIN, config, eval_dataset=VAL, progress=False, on_step=interrupt)
    assert _digest(tmp_path / "best_model.pth") == saved["best"]  # untouched
    assert load_model(tmp_path).variant == "fast"  # loads cleanly
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # and resuming finishes the run
    again = TransformerModelWrapper(_config())
    entry = again.train(TRAIN, config, eval_dataset=VAL, progress=False, resume=True)
    assert entry["epoch"] == 2


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    whole, _ = _losses(tmp_path / "whole", "fast", epochs=3)
    first = _on_cpu(TransformerModelWrapper(_config()))
    first.train(TRAIN, _training(tmp_path / "split", epochs=2), eval_dataset=VAL, progress=False)
    second = _on_cpu(TransformerModelWrapper(_config(seed=5)))  # resume must replace its init
    second.train(
        TRAIN,
        _training(tmp_path / "split", epochs=3),
        eval_dataset=VAL,
        progress=False,
        resume=True,
    )
    for p, q in zip(whole.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_nan_loss_stops_without_writing_nan_weights(tmp_path):
    wrapper = TransformerModelWrapper(_config())
    steps = []

    def poison(module, args, output):
        return output * float("nan") if len(steps) >= 7 else output

    wrapper.model.output_layer.register_forward_hook(poison)
    with pytest.raises(T.TrainingError, match="loss is nan at epoch 1"):
        wrapper.train(
            TRAIN,
            _training(tmp_path),
            eval_dataset=VAL,
            progress=False,
            on_step=lambda s, loss: steps.append(s),
        )
    saved = torch.load(tmp_path / "best_model.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved.values())
    # the guard runs before the optimizer step: the model in memory is intact
    # too, and holds no NaN gradient that a second train() would add to
    assert all(torch.isfinite(p).all() and p.grad is None for p in wrapper.model.parameters())


def test_a_directory_holding_a_run_is_never_silently_overwritten(tmp_path):
    TransformerModelWrapper(_config()).train(TRAIN, _training(tmp_path, epochs=1), progress=False)
    before = _digest(tmp_path / "best_model.pth")
    with pytest.raises(T.TrainingError, match="already holds a run"):
        TransformerModelWrapper(_config(seed=3)).train(
            TRAIN, _training(tmp_path, epochs=1), progress=False
        )
    assert _digest(tmp_path / "best_model.pth") == before
    TransformerModelWrapper(_config(seed=3)).train(
        TRAIN, _training(tmp_path, epochs=1), progress=False, overwrite=True
    )
    assert _digest(tmp_path / "best_model.pth") != before
    with pytest.raises(T.TrainingError, match="nothing to resume"):
        TransformerModelWrapper(_config()).train(
            TRAIN, _training(tmp_path / "new"), progress=False, resume=True
        )


def test_freeze_embeddings_keeps_them(tmp_path):
    wrapper = TransformerModelWrapper(_config())
    before = wrapper.model.embedding.weight.detach().clone()
    wrapper.train(TRAIN, _training(tmp_path, epochs=1, freeze_embeddings=True), progress=False)
    assert torch.equal(wrapper.model.embedding.weight, before)


def test_the_model_range_check_is_restored_after_training(tmp_path):
    wrapper = TransformerModelWrapper(_config())
    wrapper.train(TRAIN, _training(tmp_path, epochs=1), progress=False)
    assert wrapper.model.check_token_ids is True
