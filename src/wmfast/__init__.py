"""wmfast: fast, provably equivalent drop-in versions of the workingmem models.

Change ``from workingmem.model import ...`` to ``from wmfast import ...``.
Importing wmfast is cheap: it never touches CUDA, triton or nnsight.
"""

from wmfast.activations import run_with_cache
from wmfast.build import VARIANTS, build_model
from wmfast.checkpoint import CheckpointError, load_model, save_run
from wmfast.config import ConfigError, ModelConfig, TrainingConfig
from wmfast.determinism import set_deterministic
from wmfast.fast import FastOptions, describe, make_fast
from wmfast.heads import ablate_heads
from wmfast.patterns import attention_pattern, attention_patterns
from wmfast.wrappers import (
    LSTMModelWrapper,
    ModelWrapper,
    RNNModelWrapper,
    TransformerModelWrapper,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "ConfigError",
    "FastOptions",
    "LSTMModelWrapper",
    "ModelConfig",
    "ModelWrapper",
    "RNNModelWrapper",
    "TrainingConfig",
    "TransformerModelWrapper",
    "__version__",
    "ablate_heads",
    "attention_pattern",
    "attention_patterns",
    "build_model",
    "describe",
    "load_model",
    "make_fast",
    "run_with_cache",
    "save_run",
    "set_deterministic",
]
