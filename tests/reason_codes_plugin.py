"""A pytest plugin for tests/test_reasons.py: records every ``Skip`` a test run creates (its
location, code and reason) as JSON lines in the file ``$REASON_CODES_LOG`` names, so that the
near-miss tests of every format can be checked for codes without repeating them."""

from __future__ import annotations

import json
import os

from gconv_rewrite.report import Skip

_original_init = Skip.__init__


def _recording_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    with open(os.environ["REASON_CODES_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps({"location": self.location, "code": self.code, "reason": self.reason,
                              "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\n")


Skip.__init__ = _recording_init
