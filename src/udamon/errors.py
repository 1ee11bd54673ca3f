"""Error classes that map onto udamon's exit codes.

The CLI prints ``str(error)`` as one line on stderr and exits with ``exit_code``;
anything else that escapes is an internal error (exit 1).
"""


class UdamonError(Exception):
    """Base class: a failure the user should see as one clear line."""

    exit_code = 1


class UsageError(UdamonError):
    """Bad command-line usage or bad configuration (exit 2)."""

    exit_code = 2


class InputError(UdamonError):
    """Bad input data: a record, CSV or spec file that does not parse (exit 2)."""

    exit_code = 2


class RuntimeFailure(UdamonError):
    """The environment failed us at run time: a kernel feature, permission, I/O (exit 1)."""

    exit_code = 1


class TargetGone(RuntimeFailure):
    """A monitored process vanished."""
