"""build_model: a config (and a variant name) in, a model out.

The variant is named by one argument everywhere: ``"reference"`` (plain eager
PyTorch, workingmem's semantics) or ``"fast"`` (the same module tree, computed
faster; not available yet in this version).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from wmfast.config import ConfigError, ModelConfig
from wmfast.models import create_model

logger = logging.getLogger("wmfast")

VARIANTS = ("reference", "fast")
DEFAULT_VARIANT = "reference"


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {list(VARIANTS)}; got {variant!r}")
    if variant == "fast":
        raise NotImplementedError(
            "variant='fast' is not available yet in this version of wmfast; "
            "use variant='reference' (the fast variants are being built)"
        )


def seed_like_workingmem(seed: int | str | None) -> None:
    """Seed torch and numpy as workingmem does before building a model.

    This reseeds the global generators, exactly as workingmem's wrappers do:
    the seed decides the initial weights, which researchers rerun by seed.
    """
    if seed is not None:
        torch.manual_seed(int(seed))
        np.random.seed(int(seed))


def build_model(config: ModelConfig, variant: str = DEFAULT_VARIANT) -> nn.Module:
    """Build the model ``config`` describes.

    With ``config.seed`` set, the global RNGs are seeded first and the weights are
    bit-for-bit those workingmem gives for that seed. With
    ``config.from_pretrained`` set, the model is loaded from that run directory
    (its stored config.yaml wins; the other fields passed are ignored, with a
    warning, as in workingmem).
    """
    check_variant(variant)
    if config.from_pretrained is not None:
        from wmfast.checkpoint import load_model

        logger.warning(
            "loading model from checkpoint %s; the other ModelConfig fields passed are ignored",
            config.from_pretrained,
        )
        return load_model(config.from_pretrained, variant=variant)
    config.require_vocab()
    seed_like_workingmem(config.seed)
    return create_model(config)
