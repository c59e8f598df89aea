"""Progress bars are for people: quiet under CI, when stderr is not a terminal, and on all but
the main process of a multi-process run (one bar per stage, not one per process)."""

import os
import sys

from . import distributed


def progress_disabled() -> bool:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") or not sys.stderr.isatty():
        return True
    return not distributed.is_main()
