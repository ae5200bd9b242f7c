"""Triton kernels and their launchers, installed as ``wmfast.kernels``.

Nothing here imports triton at package import time: the kernels module is
imported only when a kernel is first used.
"""
