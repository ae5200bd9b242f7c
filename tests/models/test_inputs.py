"""Bad input gets a clear error naming the problem, in every model."""

from __future__ import annotations

import pytest
import torch

from ..helpers import POSITIONAL_TYPES, random_ids, reference_model, small_config

ALL_MODELS = [("transformer", pe) for pe in POSITIONAL_TYPES] + [("rnn", None), ("lstm", None)]


def _model(cls, pe, **kw):
    return reference_model(
        small_config(
            model_class=cls,
            positional_embedding_type=pe,
            act_fn="tanh" if cls == "rnn" else "relu",
            **kw,
        )
    )


@pytest.mark.parametrize("cls, pe", ALL_MODELS)
@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.tensor([1, 2, 3]), ValueError, "2-D"),
        (torch.ones(1, 2, 3, dtype=torch.long), ValueError, "2-D"),
        (torch.ones(2, 3), TypeError, "integer token ids"),
        (torch.ones(2, 3, dtype=torch.bool), TypeError, "integer token ids"),
        (torch.ones(2, 3, dtype=torch.uint8), TypeError, "integer token ids"),
        (torch.ones(2, 0, dtype=torch.long), ValueError, "empty"),
        ([[1, 2]], TypeError, "torch.Tensor"),
        (torch.tensor([[1, 50]]), ValueError, "token id 50 is out of range"),
        (torch.tensor([[-1, 2]]), ValueError, "token id -1 is out of range"),
    ],
)
def test_bad_input_is_a_clear_error(cls, pe, bad, error, message):
    with pytest.raises(error, match=message):
        _model(cls, pe)(bad)


def test_int32_ids_are_accepted():
    model = _model("transformer", "standard").eval()
    ids = random_ids(0, 50, 2, 5)
    torch.testing.assert_close(model(ids.int()), model(ids), rtol=0, atol=0)


def test_longer_than_n_ctx_is_an_error_only_with_learned_positions():
    ids = random_ids(0, 50, 1, 65)  # n_ctx is 64
    with pytest.raises(ValueError, match="exceeds n_ctx=64"):
        _model("transformer", "standard")(ids)
    for pe in ("rotary", None, "rotary_qk"):
        assert _model("transformer", pe)(ids).shape == (1, 65, 50)


def test_range_check_switch_turns_off_only_the_range_check():
    model = _model("transformer", None)
    model.check_token_ids = False
    # now nothing of ours runs the reduction: the embedding itself fails on the bad id
    with pytest.raises(IndexError):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="2-D"):  # shape checks stay on
        model(torch.tensor([1, 2]))
