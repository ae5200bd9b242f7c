"""How far fast's gradients are from fp64, beside the fp32 reference's, on a GPU.

    python tools/fp64_grad_errors.py [--device cuda]

For wmfast check's four transformers at its input size, in training mode, it
runs the reference in fp32 and in fp64 and the fast variant in fp32 (with the
norm rule's choice and with norm="torch"), and prints per model the largest
error against fp64 of the logits and of the parameter gradients, and the
worst ratio of fast's error to the fp32 reference's over all of them. A ratio
near 1 says fast rounds as much as the reference does; a wrong gradient shows
as a ratio in the hundreds, as does a ReLU input within rounding of zero (a
kink: see wmfast.backends.COMPILED_TRAINING_EMBEDDING_ROTATION). tests/test_fast.py's check-size test asserts the
ratio stays under 2. It is not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from tests.helpers import errors_against_fp64, random_ids, reference_model  # noqa: E402
from wmfast import make_fast  # noqa: E402
from wmfast.check import DEFAULT_BATCH, DEFAULT_SEQ_LEN, default_configs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    print(
        f"{'model':24s} {'fast':12s} {'logits ref/fast':>20s} {'grads ref/fast':>20s}  worst ratio"
    )
    for name, config in default_configs().items():
        if not name.startswith("transformer"):
            continue
        reference = reference_model(config).to(args.device).train()
        ids = random_ids(11, config.d_vocab, DEFAULT_BATCH, DEFAULT_SEQ_LEN)
        for label, options in (("norm rule", {}), ('norm="torch"', {"norm": "torch"})):
            torch._dynamo.reset()
            fast = make_fast(reference, **options).train()
            errors = errors_against_fp64(reference, fast, ids)
            ref_l, fast_l, _ = errors.pop("logits")
            ref_g = max(e[0] for e in errors.values())
            fast_g = max(e[1] for e in errors.values())
            ratio, worst = max((e[1] / max(e[0], 1e-12), n) for n, e in errors.items())
            print(
                f"{name:24s} {label:12s} {ref_l:9.1e}/{fast_l:9.1e} {ref_g:9.1e}/{fast_g:9.1e}"
                f"  {ratio:5.2f} ({worst})"
            )


if __name__ == "__main__":
    main()
