"""torch ops for the fast path.

``wmfast.ops.rotary`` wraps wmfast's Triton kernels; import it explicitly: it
imports triton, which the rest of wmfast never does at import time.
The eager ops, for where nothing is compiled (the CPU training step):

* ``rotary_eager``: the in-projection with RoPE on q and k in few kernels;
* ``mlp_eager``: the ReLU feed-forward block with its ReLU in place;
* ``tail_eager``: the last layer from its attention on, with a backward for
  the positions the loss reads;
* ``rnn_eager``: the Elman RNN with its backward through time written out;
* ``output_layer_eager``: the recurrent models' output layer with a
  backward for the rows the loss reads.
"""
