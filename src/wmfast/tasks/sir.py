"""Store-Ignore-Recall (SIR): the working-memory task of workingmem, generated.

Each trial is 4 tokens ``St|Ig reg_i item_j same|diff``: an instruction (store
the item in the register, or ignore it), a register, an item, and the answer:
``same`` if the item equals what the register holds now, else ``diff``. A
Store then writes the item into the register. The first use of a register in
a sequence is always a Store (there is nothing to ignore yet), and its answer
is ``diff`` (the register is empty). A sequence of ``seq_len`` trials is
``4 * seq_len`` tokens with the answers at every 4th position (3, 7, 11, ...).

Token ids (workingmem's tokenizer): UNK 0, PAD 1, St 3, Ig 4, same 7, diff 8,
registers ``100 + i``, items ``max(300, 100 + n_reg) + j``; with 50 registers
and 50 items the vocabulary has 350 ids.

Sequences are generated from (seed, index), so a dataset is reproducible and
random-access without being stored.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

UNK, PAD, STORE, IGNORE, SAME, DIFF = 0, 1, 3, 4, 7, 8
REGISTER_BASE = 100
TOKENS_PER_TRIAL = 4
ANSWER_OFFSET = 3  # the answer is the 4th token of each trial


@dataclasses.dataclass(frozen=True)
class SIRConfig:
    n_reg: int = 50  # registers in the vocabulary
    n_items: int = 50  # items in the vocabulary
    concurrent_reg: int = 2  # registers used within one sequence
    concurrent_items: int = 4  # items used within one sequence
    seq_len: int = 200  # trials per sequence (4 tokens each: 800 tokens)
    n_sequences: int = 1000
    ignore_prob: float = 0.5  # P(Ignore) once a register has been stored to
    same_prob: float = 0.5  # P(the item shown equals the register's content)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "n_reg",
            "n_items",
            "concurrent_reg",
            "concurrent_items",
            "seq_len",
            "n_sequences",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"SIRConfig.{name} must be an integer >= 1; got {getattr(self, name)!r}"
                )
        if self.concurrent_reg > self.n_reg:
            raise ValueError(f"concurrent_reg ({self.concurrent_reg}) exceeds n_reg ({self.n_reg})")
        if not 2 <= self.concurrent_items <= self.n_items:
            raise ValueError(
                f"concurrent_items must be in [2, n_items={self.n_items}]; got {self.concurrent_items}"
            )
        for name in ("ignore_prob", "same_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SIRConfig.{name} must be in [0, 1]; got {getattr(self, name)!r}")

    @property
    def item_base(self) -> int:
        return max(300, REGISTER_BASE + self.n_reg)

    @property
    def vocab_size(self) -> int:
        return self.item_base + self.n_items

    @property
    def n_tokens(self) -> int:
        return TOKENS_PER_TRIAL * self.seq_len


def generate_sequence(config: SIRConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sequence: (token_ids, answer_locations), each (4 * seq_len,) int64."""
    registers = rng.choice(config.n_reg, size=config.concurrent_reg, replace=False).tolist()
    items = rng.choice(config.n_items, size=config.concurrent_items, replace=False).tolist()
    # ``options[rng.integers(len(options))]`` is the draw ``rng.choice(options)``
    # makes (the same numbers from the same stream: a seed's sequences never
    # change), at a fifth of its cost: rng.choice's checks took ~8 us a call,
    # 4 ms a sequence of 200 trials, and a batch of 256 sequences a second
    integers, uniform = rng.integers, rng.random
    stored: dict[int, int] = {}
    tokens: list[int] = []
    for _ in range(config.seq_len):
        reg = registers[integers(len(registers))]
        current = stored.get(reg)
        if current is not None and uniform() < config.same_prob:
            item = current
        else:
            others = [i for i in items if i != current]
            item = others[integers(len(others))]
        store = current is None or uniform() >= config.ignore_prob
        if store:
            stored[reg] = item
        tokens += (
            STORE if store else IGNORE,
            REGISTER_BASE + reg,
            config.item_base + item,
            SAME if item == current else DIFF,
        )
    return np.array(tokens, dtype=np.int64), answer_locations(config)


def answer_locations(config: SIRConfig) -> np.ndarray:
    """(4 * seq_len,) int64: 1 at the answers (every 4th token), else 0."""
    locations = np.zeros(config.n_tokens, dtype=np.int64)
    locations[ANSWER_OFFSET::TOKENS_PER_TRIAL] = 1
    return locations


class SIRDataset(Dataset):
    """A torch Dataset of SIR sequences, as the wrappers' ``train`` takes them:
    each item is ``{"token_ids": (T,) long, "answer_locations": (T,) long}``.

    A sequence is generated on its first access and kept (``cache=True``, 2
    bytes a token: 16 MB for 10,000 sequences of 800 tokens), so the epochs
    after the first read it back. Generating takes ~1 ms a sequence of 200
    trials on one CPU core, a quarter of a second for a batch of 256: far more
    than a training step of the fast model on a GPU (~20 ms at the SIR
    shape). ``cache=False`` regenerates on every access (the same values).
    """

    def __init__(self, config: SIRConfig | None = None, *, cache: bool = True, **fields) -> None:
        self.config = config if config is not None else SIRConfig(**fields)
        # index -> token ids in the smallest integer dtype that holds the vocabulary
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self._cache_dtype = (
            np.int16 if self.config.vocab_size <= np.iinfo(np.int16).max else np.int32
        )

    def __len__(self) -> int:
        return self.config.n_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        kept = self._cache.get(index) if self._cache is not None else None
        if kept is None:
            # one stream per (seed, index): reproducible, random access, independent sequences
            tokens, _ = generate_sequence(
                self.config, np.random.default_rng([self.config.seed, index])
            )
            if self._cache is not None:
                self._cache[index] = tokens.astype(self._cache_dtype)
        else:
            tokens = kept.astype(np.int64)  # a new array: a caller's edit never reaches the cache
        return {
            "token_ids": torch.from_numpy(tokens),
            "answer_locations": torch.from_numpy(answer_locations(self.config)),
        }

    def __repr__(self) -> str:
        c = self.config
        return f"SIRDataset(n_reg={c.n_reg}, concurrent_reg={c.concurrent_reg}, seq_len={c.seq_len}, n={c.n_sequences}, seed={c.seed})"
