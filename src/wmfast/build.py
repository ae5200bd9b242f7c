"""build_model: a config (and a variant name) in, a model out.

The variant is named by one argument everywhere: ``"reference"`` (plain eager
PyTorch, workingmem's semantics) or ``"fast"`` (the default: the same module
tree, computing the same function faster; see wmfast.fast).
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
DEFAULT_VARIANT = "fast"


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {list(VARIANTS)}; got {variant!r}")


def apply_variant(model: nn.Module, variant: str, fast_options=None) -> nn.Module:
    """Make a freshly built reference model the variant asked for (in place)."""
    check_variant(variant)
    if variant == "fast":
        from wmfast.fast import attach_fast

        return attach_fast(model, fast_options)
    if fast_options is not None:
        raise ConfigError("fast_options only apply to variant='fast'")
    return model


def seed_like_workingmem(seed: int | str | None) -> None:
    """Seed torch and numpy as workingmem does before building a model.

    This reseeds the global generators, exactly as workingmem's wrappers do:
    the seed decides the initial weights, which researchers rerun by seed.
    """
    if seed is not None:
        torch.manual_seed(int(seed))
        np.random.seed(int(seed))


def build_model(
    config: ModelConfig, variant: str = DEFAULT_VARIANT, fast_options=None
) -> nn.Module:
    """Build the model ``config`` describes.

    With ``config.seed`` set, the global RNGs are seeded first and the weights are
    bit-for-bit those workingmem gives for that seed. With
    ``config.from_pretrained`` set, the model is loaded from that run directory
    (its stored config.yaml wins; the other fields passed are ignored, with a
    warning, as in workingmem). ``fast_options``: a wmfast.fast.FastOptions.
    """
    check_variant(variant)
    if config.from_pretrained is not None:
        from wmfast.checkpoint import load_model

        logger.warning(
            "loading model from checkpoint %s; the other ModelConfig fields passed are ignored",
            config.from_pretrained,
        )
        return load_model(config.from_pretrained, variant=variant, fast_options=fast_options)
    config.require_vocab()
    seed_like_workingmem(config.seed)
    return apply_variant(create_model(config), variant, fast_options)
