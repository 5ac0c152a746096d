"""Keras rewrites: read ``.keras`` / legacy ``.h5`` files as data, fuse, rebuild, verify in Keras.

``backend.KerasBackend`` is the Keras backend of ``gconv_rewrite.backend``; ``fuse_grouped_conv`` and
``expand_grouped_conv`` are the rewrites; ``model`` (analysis, reference, running), ``_config``
(the file as data), ``_lambdas`` (trusted bytecode, probing, late binding), ``_slices`` (which
calls read a channel range) and ``_build`` (the functional model rebuilt call by call) are its
parts; ``to_savedmodel.KerasToSavedModel`` is the ``--to savedmodel`` conversion (and the first
hop of ``--to onnx``).
"""
