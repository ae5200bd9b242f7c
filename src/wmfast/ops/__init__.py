"""torch ops backed by wmfast's Triton kernels.

Import the submodules explicitly (``wmfast.ops.rotary``): they import triton,
which the rest of wmfast never does at import time.
"""
