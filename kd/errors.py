"""User-facing errors: caught at the entry points and printed as one line, no traceback."""

import contextlib
import os
import sys


class KDError(Exception):
    """Bad input from the user (config, data, models); the message names the file/row/key."""


class ConfigError(KDError):
    pass


class DataError(KDError):
    pass


class ModelError(KDError):
    pass


@contextlib.contextmanager
def one_line_errors():
    """Entry points: a KDError becomes `kd: error: ...` on stderr (once, from rank 0: every rank
    fails the same way) and exit status 2."""
    try:
        yield
    except KDError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"kd: error: {e}", file=sys.stderr)
        sys.exit(2)
