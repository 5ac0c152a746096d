"""TensorFlow SavedModel rewrites, on one frozen, inlined GraphDef per signature.

- ``savedmodel``: load a signature (freeze, inline calls), write a SavedModel, verify in TF,
  and ``rewrite_savedmodel``, the entry point ``rewriter.api`` dispatches to.
- ``fuse_split_conv``: channel split → N Conv2D → ConcatV2 ⇒ one grouped Conv2D.
- ``expand_grouped_conv``: grouped Conv2D ⇒ Split → N Conv2D → ConcatV2.
- ``to_onnx``: ``--to onnx`` through tf2onnx, each grouped conv one ``Conv(group=N)``;
  ``savedmodel_to_onnx`` for the Keras backend.

Importing this package does not import TensorFlow; its modules do.
"""
