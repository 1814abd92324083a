"""The one exception type for problems the user can fix (bad files, paths, config values)."""
from __future__ import annotations


class InputError(ValueError):
    """A user-input problem, with a message that names the file, line or config key at fault.

    The CLI catches exactly this type, prints ``error: <message>`` on one line and exits with
    status 2, so the message must be self-contained. Anything else that escapes is a bug and
    keeps its traceback. Subclassing ValueError keeps ``except ValueError`` callers working.
    """
