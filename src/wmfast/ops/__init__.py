"""torch ops for the fast path.

``wmfast.ops.rotary`` wraps wmfast's Triton kernels; import it explicitly: it
imports triton, which the rest of wmfast never does at import time.
``wmfast.ops.rotary_eager`` is the in-projection with RoPE on q and k in few
eager PyTorch kernels, and ``wmfast.ops.mlp_eager`` the ReLU feed-forward
block with its ReLU in place.
"""
