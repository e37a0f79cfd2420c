"""One exception type for every bad-input or environment problem a user can fix.

The CLI prints its message as one line and exits non-zero; library callers
can catch it. Messages say what is wrong, where, and how to fix it.
"""


class TopoCAMError(Exception):
    """A problem the user can fix (bad input, missing file, bad option)."""


class DegenerateBackboneWarning(UserWarning):
    """The backbone predicts a single class on validation: its predicted-class CAMs
    all explain that class. Reported, never silently used (DESIGN.md §2.10)."""


class CorruptCacheWarning(UserWarning):
    """A cache entry (backbone checkpoint, CAM folder) could not be read back: it is
    named and rebuilt, never used (a kill -9 or a disk error can leave one)."""


class DamagedStoreWarning(UserWarning):
    """A local store that could not be opened and held nothing (a half-created MLflow database)
    was moved aside, named, and created anew."""


class InfrastructureError(TopoCAMError):
    """The Optuna storage, the MLflow tracking store or the disk failed: not the fault of the
    configuration being tried. A study stops on it (the trial does not count toward the budget)."""


class StudyFileWarning(UserWarning):
    """A study file that reads, but probably not as its author meant: said in one line."""


class DeprecatedKeyWarning(StudyFileWarning):
    """A study file uses a key's old name: still read, said in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``): the process stops as on Ctrl-C (a KeyboardInterrupt, so
    everything that cleans up after Ctrl-C does so), and says it was terminated."""
