"""Triton kernels and their launchers, installed as ``wmfast.kernels``.

Nothing here imports triton at package import time: the kernels module is
imported only when a kernel is first used.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_to_the_installed_kernels() -> None:
    """Replace this module with the installed top-level ``kernels`` package, if any.

    wmfast only ever imports this folder as ``wmfast.kernels``. Imported as a
    top-level ``kernels``, it is because the checkout's root is on sys.path
    (a script run from the root; pytest puts the root there for tests/ and
    bench/), and it shadows Hugging Face's ``kernels`` distribution, which
    transformers imports when that is installed: ``import
    transformers.activations`` then fails on a name this folder lacks. The
    import system returns whatever sys.modules holds once this file has run.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return  # nothing else to be: stay this folder
    installed = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = installed
    spec.loader.exec_module(installed)


if __name__ == "kernels":
    _hand_over_to_the_installed_kernels()
