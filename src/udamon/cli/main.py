"""The ``udamon`` command: subcommand dispatch and the error-to-exit-code contract.

This module imports only light modules at the top: the subcommands (numpy and
the rest, ~0.5 s) are imported inside :func:`main`, so that a Ctrl-C during
start-up is caught like any other (one line, exit 130), not a traceback.
"""

from __future__ import annotations

import os
import sys

from udamon import __version__
from udamon.errors import ParameterError, UdamonError

DESCRIPTION = """\
DAMON-style data access monitoring from user space.  Every access report says
which CPU (and NUMA node) and which thread made it, and whether it was a read
or a write; sample filters choose which reports count, probes count more.

Start with 'udamon demo'.  Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.
"""


def build_parser():
    import argparse

    from udamon.cli import (
        demo,
        dirty_rate,
        export,
        exporter,
        import_cmd,
        ksm_advise,
        migrate,
        monitor,
        place,
        record,
        report,
        synth,
    )
    from udamon.cli.common import Parser
    from udamon.cli.guide import GUIDE_HELP

    p = Parser(prog="udamon", description=DESCRIPTION, epilog=GUIDE_HELP,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"udamon {__version__}")
    sub = p.add_subparsers(dest="subcommand", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for mod in (record, report, monitor, migrate, place, dirty_rate, ksm_advise, exporter,
                export, import_cmd, synth, demo):
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UdamonError as e:
        msg = e.for_option() if isinstance(e, ParameterError) else str(e)
        print(f"udamon: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("udamon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 0
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    except Exception as e:  # an internal error: say so in one line, traceback on request
        if os.environ.get("UDAMON_DEBUG"):
            raise
        print(f"udamon: internal error: {type(e).__name__}: {e} "
              "(rerun with UDAMON_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
