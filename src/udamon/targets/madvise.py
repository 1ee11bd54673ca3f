"""``madvise`` inside another process: offer ranges to KSM, or take them back.

``MADV_MERGEABLE`` / ``MADV_UNMERGEABLE`` act on the caller's own mm, so they run
in the target, by the ptrace syscall injection of udamon.targets.inject (its
``Injector``: seccomp refused, registers restored, syscall restart kept).  As
for the userfaultfd, the injection runs in a short-lived helper process
(``python -m udamon.targets.madvise``) that ignores SIGINT/SIGTERM: a SIGKILL
of udamon while the target's registers point at the injected syscall cannot
leave them so.  All ranges of a target are done in one stop.  The helper
answers with one JSON line: per range the raw result (0 or -errno).

The target's data are not touched: ``MADV_MERGEABLE`` only marks the VMA (it may
split it at the range's edges); ``MADV_UNMERGEABLE`` breaks the sharing of the
range's KSM pages (each gets its own copy again, so memory use grows by those).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from udamon.errors import RuntimeFailure, TargetGone

NR_MADVISE = 28
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
ADVICE = {"mergeable": MADV_MERGEABLE, "unmergeable": MADV_UNMERGEABLE}


def madvise_isolated(pid: int, calls: list[tuple[int, int, int]], timeout: float = 60.0
                     ) -> list[int]:
    """Run ``madvise(start, length, advice)`` for each of ``calls`` in process ``pid``
    (one ptrace stop, in a helper process); returns the results (0 or -errno)."""
    if not calls:
        return []
    arg = json.dumps([[int(a), int(n), int(adv)] for a, n, adv in calls])
    try:
        p = subprocess.run([sys.executable, "-m", "udamon.targets.madvise", str(pid)],
                           input=arg, capture_output=True, text=True, timeout=timeout,
                           start_new_session=True)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"madvise in process {pid}: the helper did not finish in "
                             f"{timeout:.0f} s") from None
    except OSError as e:
        raise RuntimeFailure(f"cannot start the madvise helper: {e.strerror}") from None
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeFailure(f"the madvise helper failed (exit {p.returncode}): "
                             f"{p.stderr.strip()[-300:]}") from None
    if "gone" in out:
        raise TargetGone(out["gone"])
    if "error" in out:
        raise RuntimeFailure(out["error"])
    return [int(r) for r in out["results"]]


def _helper_main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from udamon.targets.inject import Injector

    pid = int(argv[0])
    calls = json.loads(sys.stdin.read())
    try:
        with Injector(pid) as inj:
            results = [inj.call(NR_MADVISE, a, n, adv) for a, n, adv in calls]
        msg: dict = {"results": results}
    except TargetGone as e:
        msg = {"gone": str(e)}
    except RuntimeFailure as e:
        msg = {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - everything goes back as one line
        msg = {"error": f"madvise helper: {type(e).__name__}: {e}"}
    print(json.dumps(msg), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
