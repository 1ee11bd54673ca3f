"""``udamon dirty-rate``: how fast each VM (or process) dirties memory, live; which to migrate.

Options become a ``DirtyRateSpec`` for udamon.report.dirty_live (targets and
their parts, the estimator of udamon.primitives.dirty_sample window after
window, rates and intervals by udamon.report.dirty_rate).  ``-o FILE`` keeps the
windows as a record, which ``udamon report dirty -i FILE`` reads again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from udamon.cli.common import duration_arg, pid_list, positive_int, typed
from udamon.errors import UsageError
from udamon.report import precopy
from udamon.units import parse_range, parse_size

DESCRIPTION = """\
Estimate the dirty rate of running processes -- VMs above all -- the way QEMU's
calc-dirty-rate defines it: distinct pages dirtied per window (1 s by default),
times the page size, per second.  Every window a uniform random sample of each
target's resident pages is write-protected (userfaultfd, asynchronous: the
target never waits) and checked at the window's end; --exact protects every
page instead.  The estimate comes with a confidence interval; the run ends when
every target's interval lies within --precision of its estimate (after three
windows at least) or after --duration.

For a VMM (QEMU, Firecracker, cloud-hypervisor) the rate is its guest RAM's --
what a live migration sends -- and the VMM's own memory is shown on its own
line; --range PID:START-END says where guest RAM is instead.  Targets are ranked
slowest dirtier first: rank 1 is the VM to migrate.  --bandwidth adds QEMU's
pre-copy estimate per target: whether it converges, how long it takes and the
final downtime.
"""

EPILOG = """\
examples:
  udamon dirty-rate --pid 4101,4102,4103
  udamon dirty-rate --pid 4101,4102 --bandwidth 10Gbit/s --downtime 300ms
  udamon dirty-rate --pid 4101 --exact --duration 30s --precision 0 -o vm.jsonl
  udamon report dirty -i vm.jsonl --bandwidth 1GiB/s --format json

Exit codes: 0 ok, 1 runtime failure (e.g. no userfaultfd write-protect), 2 bad usage."""

_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
         "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12}


def parse_rate(text: str) -> float:
    """A bandwidth in bytes/s: '10Gbit/s', '10gbps' (decimal bits), '1GiB/s', '125MB/s'
    (sizes per second, binary units as udamon's sizes)."""
    t = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)(?:/s)?", t)
    if m and m.group(2) in _BITS:
        v = float(m.group(1)) * _BITS[m.group(2)] / 8
    else:
        body = t[:-2] if t.endswith("/s") else None
        if body is None:
            raise ValueError(f"bad rate {text!r} (e.g. 10Gbit/s, 1GiB/s, 125MiB/s)")
        v = float(parse_size(body))
    if v <= 0:
        raise ValueError(f"the rate must be positive, got {text!r}")
    return v


def _precision(text: str) -> float:
    v = float(text)
    if v != 0 and v <= 1:
        raise ValueError("--precision is a factor above 1 (e.g. 1.25), or 0 to run the whole "
                         "--duration")
    return v


def _confidence(text: str) -> float:
    v = float(text)
    if not 0.5 <= v < 1:
        raise ValueError("--confidence must be within 0.5..0.999")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("dirty-rate", help="live dirty rate per VM/process, ranked for "
                                          "live migration (QEMU's definition)",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=typed(pid_list, "pid list"), action="append", required=True,
                   metavar="PID[,PID...]", help="target processes (repeatable)")
    _estimate_args(p.add_argument_group("estimate"))
    m = p.add_argument_group("pre-copy live migration (QEMU's model)")
    m.add_argument("--bandwidth", metavar="RATE", type=typed(parse_rate, "rate"),
                   help="migration bandwidth, e.g. 10Gbit/s or 1GiB/s")
    m.add_argument("--downtime", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=precopy.DEFAULT_DOWNTIME_NS,
                   help="downtime limit (default 300ms, QEMU's)")
    o = p.add_argument_group("output")
    o.add_argument("--format", choices=["text", "json"], default="text")
    o.add_argument("-o", "--output", metavar="FILE",
                   help="also write the windows as a record (udamon report dirty -i FILE)")
    o.add_argument("-q", "--quiet", action="store_true", help="no line per window on stderr")
    p.set_defaults(func=run)


def _estimate_args(g) -> None:
    g.add_argument("--window", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=1_000_000_000,
                   help="measuring window (default 1s, QEMU's shortest useful calc-time)")
    g.add_argument("--duration", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=10_000_000_000, help="at most this long (default 10s)")
    g.add_argument("--precision", metavar="X", type=typed(_precision, "factor"),
                   default=1.25, help="stop once every interval is within a factor X of its "
                                      "estimate, after 3 windows (default 1.25; 0: run the "
                                      "whole --duration)")
    g.add_argument("--confidence", metavar="C", type=typed(_confidence, "confidence"),
                   default=0.95, help="of the intervals (default 0.95)")
    g.add_argument("--exact", action="store_true",
                   help="count every page (PAGEMAP_SCAN with PM_SCAN_WP_MATCHING each window) "
                        "instead of a sample: exact, and costlier for the target")
    g.add_argument("--sample-pages", metavar="N", type=typed(positive_int, "count"), default=512,
                   help="first window's sample per GiB of resident memory (default 512, "
                        "QEMU's sample-pages); later windows grow it as the share seen needs")
    g.add_argument("--max-sample-pages", metavar="N", type=typed(positive_int, "count"),
                   default=65536, help="at most this many pages per part per window "
                                       "(default 65536)")
    g.add_argument("--range", metavar="[PID:]START-END", action="append", default=[],
                   help="the memory whose rate counts (guest RAM), instead of detecting it "
                        "(repeatable; PID: is needed with several targets)")
    g.add_argument("--no-vmm", action="store_true",
                   help="do not look for a VMM's guest RAM: the whole process counts")
    g.add_argument("--seed", type=int, default=None, help="seed of the page sampling")


def parse_ranges(texts: list[str], pids: list[int]) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for t in texts:
        pid_text, sep, rng = t.rpartition(":")
        if sep:
            try:
                pid = int(pid_text)
            except ValueError:
                raise UsageError(f"bad --range {t!r}: expected [PID:]START-END") from None
            if pid not in pids:
                raise UsageError(f"--range {t!r}: {pid} is not one of the --pid targets")
        elif len(pids) == 1:
            pid = pids[0]
        else:
            raise UsageError(f"--range {t!r}: say which target it is for (PID:START-END) "
                             "when there are several")
        try:
            out.setdefault(pid, []).append(parse_range(rng))
        except ValueError as e:
            raise UsageError(f"bad --range: {e}") from None
    for pid, spans in out.items():
        spans.sort()
        for (s0, e0), (s1, _) in zip(spans[:-1], spans[1:], strict=False):
            if s1 < e0:
                raise UsageError(f"--range values of pid {pid} overlap ({s0:#x}-{e0:#x} and "
                                 f"{s1:#x}-...)")
    return out


def run(a: argparse.Namespace) -> int:
    from udamon.cli.live import install_stop
    from udamon.report import dirty_rate
    from udamon.report.dirty_live import DirtyRateSpec, measure

    pids = sorted({p for group in a.pid for p in group})
    spec = DirtyRateSpec(pids, a.window, a.duration, a.precision, a.confidence, a.exact,
                         a.sample_pages, a.max_sample_pages, parse_ranges(a.range, pids),
                         a.no_vmm, a.seed, a.bandwidth, a.downtime, a.output)
    stop = install_stop()
    run = measure(spec, stop, None if a.quiet else _progress)
    for p in run.exited:
        print(f"udamon: note: process {p} exited during the measurement", file=sys.stderr)
    if a.format == "json":
        doc = dirty_rate.to_json(run.result, a.output)
        doc["end"] = run.reason
        doc["notes"] = run.notes
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        head = [f"udamon dirty-rate: {len(pids)} target(s), ended: {run.reason}"]
        head += [f"note: {n}" for n in run.notes]
        sys.stdout.write(dirty_rate.to_text(run.result, head))
    return 0


def _progress(res, n: int) -> None:
    from udamon.report.dirty_rate import fmt_rate

    parts = [f"pid {t.pid} {fmt_rate(t.mean_bps)} [{fmt_rate(t.rate.low_bps)} .. "
             f"{fmt_rate(t.rate.high_bps)}]{' *' if t.converged else ''}" for t in res.targets]
    print(f"udamon: window {n}: " + "; ".join(parts), file=sys.stderr, flush=True)
