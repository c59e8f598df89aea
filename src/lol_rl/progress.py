"""Progress bars are for people: quiet under CI and when stderr is not a terminal."""

import os
import sys


def progress_disabled() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or not sys.stderr.isatty()
