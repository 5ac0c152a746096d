"""TensorFlow's native log noise, kept off stderr in every process the tool starts.

Importing TensorFlow 2.21 writes six lines to stderr from C++ (absl's "All log messages before
absl::InitializeLog()", oneDNN and CUDA notices) whatever ``TF_CPP_MIN_LOG_LEVEL`` says: absl
logs them before TensorFlow reads its settings. So the import runs with file descriptor 2 pointed
at a temporary file (kept for ``-v`` as a debug log record), and the variables TensorFlow and glog
do read are set first, for this process and the worker processes it spawns. A user's own values
for them win.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ logging: errors too (ours say it in one line)
    "GLOG_minloglevel": "3",  # glog-based libraries loaded with it
}

log = logging.getLogger(__name__)


def quiet_environment() -> None:
    """Set the logging variables (unless the user did) before TensorFlow can be imported; spawned
    worker processes inherit them."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


@contextmanager
def native_stderr_captured() -> Iterator[None]:
    """Point file descriptor 2 at a temporary file while the block runs (what C++ writes there
    goes to the file); log what was caught at debug level afterwards."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to protect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            caught = sink.read().decode(errors="replace").strip()
            if caught:
                log.debug("TensorFlow's native log while importing:\n%s", caught)


def import_tensorflow() -> None:
    """Import TensorFlow (and Keras, which TensorFlow-backed code imports next) without a line on
    stderr; ImportError propagates for the caller's one-line message."""
    quiet_environment()
    if "tensorflow" not in sys.modules:
        with native_stderr_captured():
            import tensorflow  # noqa: F401
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("absl").setLevel(logging.ERROR)  # absl's Python warnings, outside -v
        # TF's own Python warnings ("N out of the last N calls to <function conv.<locals>._conv_xla>
        # triggered tf.function retracing": Keras compiles each grouped conv anew at every eager call).
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
