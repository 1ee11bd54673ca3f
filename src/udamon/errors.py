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


class ParameterError(UsageError):
    """A bad value of one parameter.  The library's message names the parameter as
    the library does (``pid``, ``probe``); the CLI names its option (``--pid``)
    with ``for_option``, so that no library message speaks of command-line options."""

    def __init__(self, param: str, template: str, **fields: object):
        self.param = param
        self.template = template
        self.fields = fields
        super().__init__(template.format(param=param, **fields))

    def for_option(self, option: str | None = None) -> str:
        """The message with the CLI's option (default ``--`` + param, dashed)."""
        opt = option or "--" + self.param.replace("_", "-")
        return self.template.format(param=opt, **self.fields)


class InputError(UdamonError):
    """Bad input data: a record, CSV or spec file that does not parse (exit 2)."""

    exit_code = 2


class RecordDamaged(InputError):
    """A record with a damaged or missing line; ``intact``: the snapshots before the
    damage, which a salvaging read returns (the CLI's --salvage)."""

    def __init__(self, message: str, intact: int, *, counted: bool = False):
        hint = ("; a salvaging read takes what is there" if counted else
                f" ({intact} snapshots before it are intact; a salvaging read takes them)"
                if intact else "")
        super().__init__(message + hint)
        self.message = message
        self.intact = intact
        self.counted = counted


class RuntimeFailure(UdamonError):
    """The environment failed us at run time: a kernel feature, permission, I/O (exit 1)."""

    exit_code = 1


class TargetGone(RuntimeFailure):
    """A monitored process vanished."""
