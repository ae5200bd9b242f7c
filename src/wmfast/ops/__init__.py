"""torch ops for the fast path.

``wmfast.ops.rotary`` wraps wmfast's Triton kernels; import it explicitly: it
imports triton, which the rest of wmfast never does at import time.
``wmfast.ops.rotary_eager`` is the in-projection with RoPE on q and k in few
eager PyTorch kernels, ``wmfast.ops.mlp_eager`` the ReLU feed-forward
block with its ReLU in place, ``wmfast.ops.tail_eager`` the last layer
from its attention on, with a backward for the positions the loss reads, and
``wmfast.ops.rnn_eager`` the Elman RNN with its backward through time
written out.
"""
