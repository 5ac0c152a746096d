"""The rewrites, one module each, grouped by format (``onnx``, ``tf``, ``keras``; ``tflite`` is
an output format with no rewrite of its own).

Each format's backend (``passes.FORMAT.backend``) builds its passes by class; the driver
(``gconv_rewrite.api``) reaches them through the backend only. No module of the project is imported here,
so importing one pass loads that pass and what it needs, never the driver.
"""

import logging

# Log records (a late-bound Lambda found, a repair made) reach a handler only where the
# application configured one: the CLI shows them on stderr; a library caller decides.
logging.getLogger(__name__).addHandler(logging.NullHandler())
