"""``--to tflite``: SavedModel and Keras inputs written as TFLite flatbuffers, each grouped conv one
``CONV_2D``, proven in the TFLite interpreter against the original.

    SavedModel | Keras ─ fuse | expand (the format's own passes, verified in TF / Keras)
        ─ SavedModel ─ tf.lite.TFLiteConverter ─ .tflite ─ LiteRT interpreter vs the original

- ``backend``: TFLite as the fourth backend of ``gconv_rewrite.backend`` (load, stats, save, run,
  input specs); the driver writes and runs ``.tflite`` files through it.
- ``convert``: the converter, the interpreter (``ai-edge-litert``'s, else TensorFlow's), the
  flatbuffer's ops and the comparison rows.
- ``from_savedmodel``, ``from_keras``: the two conversions (``SavedModelToTFLite``,
  ``KerasToTFLite``) the driver hands a rewritten model to.

Importing this package does not import TensorFlow; its modules do.
"""
