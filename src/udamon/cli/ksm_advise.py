"""``udamon ksm-advise``: what memory to give KSM, seen by content and write-coldness; apply it.

Options become a ``KsmSpec`` for udamon.report.ksm_live (watch every page's
writes, hash the resident pages, advise with udamon.report.ksm_advice, and with
--apply madvise the targets through the ptrace injection path and compare with
/proc/PID/ksm_stat; KSM's settings change only with --ksm-run and are restored).
"""

from __future__ import annotations

import argparse
import json
import sys

from udamon.cli.common import duration_arg, pid_list, positive_int, typed

DESCRIPTION = """\
Find the memory KSM would merge and that stays merged: pages whose content
another page of the targets has (hashed, all-zero pages counted apart) and that
are not written (every page write-protected for --duration; the last write of
each known to within --interval).  Candidate ranges are page-exact, joined over
short gaps, and ranked by predicted saving: the pages KSM would merge
(ksm_merging_pages) or map to the zero page (ksm_zero_pages), times the page
size.

--apply offers the candidates to KSM (madvise MADV_MERGEABLE, run inside the
target by ptrace) and takes write-hot ranges back (MADV_UNMERGEABLE, where they
were offered), then waits up to --wait for KSM and prints predicted against
actual.  --dry-run says what --apply would do.  KSM's own settings are left as
they are unless --ksm-run is given: then ksmd runs (with --ksm-pages-to-scan /
--ksm-sleep if given) for this command only, and every setting is put back at
the end -- pages merged meanwhile stay merged.
"""

EPILOG = """\
examples:
  udamon ksm-advise --pid 4101,4102 --duration 30s
  udamon ksm-advise --pid 4101 --apply --dry-run
  udamon ksm-advise --pid 4101 --apply --ksm-run --ksm-pages-to-scan 2000 --wait 60s
  udamon report ksm -i ksm.jsonl --format json     (a record written with -o ksm.jsonl)

Exit codes: 0 ok, 1 runtime failure (no userfaultfd write-protect, no KSM for --apply),
2 bad usage."""


def add_parser(sub) -> None:
    p = sub.add_parser("ksm-advise", help="what to give KSM: duplicate, unwritten memory by "
                                          "page; --apply marks it mergeable",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=typed(pid_list, "pid list"), action="append", required=True,
                   metavar="PID[,PID...]", help="target processes (repeatable)")
    g = p.add_argument_group("observation")
    g.add_argument("--duration", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=10_000_000_000, help="watch writes this long (default 10s)")
    g.add_argument("--interval", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=1_000_000_000, help="write scan interval (default 1s)")
    g.add_argument("--min-age", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=None, help="cold = not written for this long (default: 10 s or "
                                      "half the duration, whichever is smaller)")
    a = p.add_argument_group("acting on it")
    a.add_argument("--apply", action="store_true",
                   help="madvise the candidates MADV_MERGEABLE and write-hot mergeable ranges "
                        "MADV_UNMERGEABLE in the targets, then wait for KSM and compare")
    a.add_argument("--dry-run", action="store_true", help="with --apply: only say what it "
                                                          "would do")
    a.add_argument("--top", type=typed(positive_int, "count"), metavar="N",
                   help="at most N candidate ranges per target (shown and applied)")
    a.add_argument("--no-unmerge", action="store_true",
                   help="with --apply: do not MADV_UNMERGEABLE the write-hot ranges")
    a.add_argument("--wait", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=60_000_000_000, help="with --apply: wait this long at most for KSM "
                                                "to merge (default 60s)")
    k = p.add_argument_group("KSM's global settings (changed only when asked, restored at exit)")
    k.add_argument("--ksm-run", action="store_true", help="run ksmd for this command")
    k.add_argument("--ksm-pages-to-scan", type=typed(positive_int, "count"), metavar="N",
                   help="with --ksm-run: pages ksmd scans per wake-up")
    k.add_argument("--ksm-sleep", metavar="DUR", type=typed(duration_arg, "duration"),
                   help="with --ksm-run: ksmd's sleep between wake-ups (e.g. 20ms)")
    o = p.add_argument_group("output")
    o.add_argument("--format", choices=["text", "json"], default="text")
    o.add_argument("-o", "--output", metavar="FILE", help="also write the advice as a record "
                                                          "(udamon report ksm -i FILE)")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from udamon.cli.live import install_stop
    from udamon.report import ksm_advice
    from udamon.report.ksm_live import KsmSpec, advise_live

    pids = sorted({p for group in a.pid for p in group})
    spec = KsmSpec(pids, a.duration, a.interval, a.min_age, a.apply, a.dry_run, a.top,
                   not a.no_unmerge, a.wait, a.ksm_run, a.ksm_pages_to_scan, a.ksm_sleep,
                   a.output)
    tty = not a.quiet and sys.stderr.isatty()
    adv, applied = advise_live(spec, install_stop(), _progress if tty else None)
    if tty:
        print("", file=sys.stderr)
    if a.format == "json":
        doc = ksm_advice.to_json(adv, a.output)
        if applied is not None:
            doc["apply"] = applied
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(ksm_advice.to_text(adv, [f"udamon ksm-advise: {len(pids)} target(s)"],
                                        a.top or 20))
    if applied is not None:
        sys.stdout.write(ksm_advice.apply_text(applied))
    return 0


def _progress(done_ns: int, total_ns: int) -> None:
    print(f"\rudamon: watching writes {done_ns / 1e9:.0f}/{total_ns / 1e9:.0f} s", end="",
          file=sys.stderr, flush=True)
