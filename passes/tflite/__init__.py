"""``--to tflite``: SavedModel and Keras inputs written as TFLite flatbuffers, each grouped conv one
``CONV_2D``, proven in the TFLite interpreter against the original.

    SavedModel | Keras ─ fuse | expand (the format's own passes, verified in TF / Keras)
        ─ SavedModel ─ tf.lite.TFLiteConverter ─ .tflite ─ LiteRT interpreter vs the original

- ``convert``: the converter, the interpreter (``ai-edge-litert``'s, else TensorFlow's), the
  flatbuffer's ops, the comparison rows and the atomic write.
- ``from_savedmodel``: the SavedModel entry point ``rewriter.api`` dispatches ``--to tflite`` to.
- ``from_keras``: called by the Keras backend with the fused model and the original.

Importing this package does not import TensorFlow; its modules do.
"""
