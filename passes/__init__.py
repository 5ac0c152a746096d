"""The rewrites, one module each, grouped by format (``onnx``, ``tf``, ``keras``; ``tflite`` is
an output format with no rewrite of its own).

Each format's backend (``passes.FORMAT.backend``) builds its passes by class; the driver
(``rewriter.api``) reaches them through the backend only. Nothing is imported here, so importing
one pass loads that pass and what it needs, never the driver.
"""
