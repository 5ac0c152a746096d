"""Keras rewrites: read ``.keras`` / legacy ``.h5`` files as data, fuse, rebuild, verify in Keras.

``model.rewrite_keras`` is the entry point ``rewriter.api`` dispatches Keras inputs to;
``fuse_grouped_conv`` is the rewrite; ``_config`` (the file as data), ``_lambdas`` (trusted
bytecode, probing, late binding), ``_slices`` (which calls read a channel range) and ``_build``
(the functional model rebuilt call by call) are its parts.
"""
