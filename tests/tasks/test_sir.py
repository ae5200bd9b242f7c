"""The SIR generator: token layout, answer positions, task semantics, balance."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast.tasks import sir
from wmfast.tasks.sir import SIRConfig, SIRDataset


def _trials(tokens: torch.Tensor) -> list[tuple[int, int, int, int]]:
    return [tuple(t) for t in tokens.view(-1, 4).tolist()]


@given(
    st.integers(1, 5),
    st.integers(2, 6),
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
    st.integers(0, 20),
)
def test_layout_and_semantics(concurrent_reg, concurrent_items, seq_len, seed, index):
    config = SIRConfig(
        concurrent_reg=concurrent_reg,
        concurrent_items=concurrent_items,
        seq_len=seq_len,
        n_sequences=21,
        seed=seed,
    )
    item = SIRDataset(config)[index]
    tokens, locations = item["token_ids"], item["answer_locations"]
    assert tokens.shape == locations.shape == (4 * seq_len,) and tokens.dtype == torch.long
    assert locations.tolist() == [1 if i % 4 == 3 else 0 for i in range(4 * seq_len)]
    assert 0 <= int(tokens.min()) and int(tokens.max()) < config.vocab_size == 350
    stored: dict[int, int] = {}
    registers, items = set(), set()
    for instruction, register, token, answer in _trials(tokens):
        assert instruction in (sir.STORE, sir.IGNORE)
        assert sir.REGISTER_BASE <= register < sir.REGISTER_BASE + config.n_reg
        assert config.item_base <= token < config.item_base + config.n_items
        if register not in stored:
            assert instruction == sir.STORE  # the first use of a register is a store
        assert answer == (sir.SAME if stored.get(register) == token else sir.DIFF)
        if instruction == sir.STORE:
            stored[register] = token
        registers.add(register)
        items.add(token)
    assert len(registers) <= concurrent_reg and len(items) <= concurrent_items


def test_same_seed_same_data_and_different_seeds_differ():
    a, b = SIRDataset(seq_len=30, seed=3), SIRDataset(seq_len=30, seed=3)
    assert torch.equal(a[5]["token_ids"], b[5]["token_ids"])
    assert not torch.equal(a[5]["token_ids"], SIRDataset(seq_len=30, seed=4)[5]["token_ids"])
    assert not torch.equal(a[5]["token_ids"], a[6]["token_ids"])


@pytest.mark.parametrize(
    "fields, index, digest",
    [
        (dict(seed=0), 0, "0e4d93b21bedc981"),
        (dict(seed=0), 9999, "71ed730e943a2aee"),
        (dict(seed=42, concurrent_reg=5, concurrent_items=8, seq_len=37), 3, "6d54b4b04454c26b"),
        (dict(seed=7, ignore_prob=0.0, same_prob=1.0, seq_len=10), 1, "652a38e77fb58fc5"),
    ],
)
def test_a_seed_keeps_its_sequences(fields, index, digest):
    """Datasets are named by their seed in experiments: the sequences of a
    (seed, index) must not change between versions. The digests are of the
    sequences as the first generator wrote them (one rng.choice per draw)."""
    tokens = SIRDataset(SIRConfig(n_sequences=10_000, **fields))[index]["token_ids"]
    assert hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16] == digest


def test_the_cache_returns_what_generation_gives_and_keeps_it_from_edits():
    cached, fresh = SIRDataset(seq_len=20, seed=5), SIRDataset(seq_len=20, seed=5, cache=False)
    first = cached[3]
    assert torch.equal(first["token_ids"], fresh[3]["token_ids"])
    first["token_ids"].zero_()  # a caller's edit of an item it was given
    first["answer_locations"].zero_()
    again = cached[3]
    assert torch.equal(again["token_ids"], fresh[3]["token_ids"])
    assert torch.equal(again["answer_locations"], fresh[3]["answer_locations"])
    assert again["token_ids"].dtype == torch.long and int(again["token_ids"].min()) > 0


def test_labels_are_balanced_after_first_uses():
    dataset = SIRDataset(seq_len=100, n_sequences=50, seed=0)
    same = total = 0
    for i in range(len(dataset)):
        seen = set()
        for _, register, _, answer in _trials(dataset[i]["token_ids"]):
            if register in seen:
                same += answer == sir.SAME
                total += 1
            seen.add(register)
    assert 0.45 < same / total < 0.55


def test_vocabulary_follows_the_number_of_registers():
    assert SIRConfig().vocab_size == 350
    assert SIRConfig(n_reg=250, n_items=10).item_base == 350


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(seq_len=0), "seq_len"),
        (dict(concurrent_reg=60), "exceeds n_reg"),
        (dict(concurrent_items=1), "concurrent_items"),
        (dict(same_prob=1.5), "same_prob"),
    ],
)
def test_bad_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        SIRConfig(**fields)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        SIRDataset(n_sequences=2)[2]
