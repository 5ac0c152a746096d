"""TensorFlow SavedModel rewrites, on one frozen, inlined GraphDef per signature.

- ``backend``: the SavedModel backend of ``gconv_rewrite.backend`` (load a signature, passes, save, run).
- ``savedmodel``: load a signature (freeze, inline calls), write a SavedModel, verify in TF.
- ``fuse_split_conv``: channel split → N Conv2D → ConcatV2 ⇒ one grouped Conv2D.
- ``expand_grouped_conv``: grouped Conv2D ⇒ Split → N Conv2D → ConcatV2.
- ``to_onnx``: the ``--to onnx`` conversion (``SavedModelToOnnx``) through tf2onnx, each grouped
  conv one ``Conv(group=N)``; the driver hands it a rewritten SavedModel or a Keras export.

Importing this package does not import TensorFlow; its modules do.
"""
