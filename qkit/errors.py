"""One error hierarchy for the library.

The CLI turns any QkitError into a single line on stderr and exit status 1
(2 for UsageError); everything else is a bug and keeps its traceback under
--debug. Subclasses that describe bad arguments also derive from ValueError so
that callers using plain Python idioms can catch them as such.
"""


class QkitError(Exception):
    """Base class of every error qkit raises on purpose."""


class UsageError(QkitError, ValueError):
    """The caller asked for something that cannot be done (unknown method, bad option)."""


class InputError(QkitError, ValueError):
    """An input array or value has the wrong dtype, shape or content."""


class FormatError(QkitError):
    """A file is corrupt, truncated, foreign or of an unsupported version."""


class DataError(QkitError):
    """A registry artifact could not be fetched, verified or unpacked."""
