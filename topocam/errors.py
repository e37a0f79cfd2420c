"""One exception type for every bad-input or environment problem a user can fix.

The CLI prints its message as one line and exits non-zero; library callers
can catch it. Messages say what is wrong, where, and how to fix it.
"""


class TopoCAMError(Exception):
    """A problem the user can fix (bad input, missing file, bad option)."""
