"""``udamon migrate``: monitor live and move hot, remotely accessed memory to the node
that accesses it (the NUMA-aware migration scheme of udamon.schemes.numa_migrate)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from udamon.cli import live
from udamon.cli.common import typed
from udamon.core.monitor import Monitor, Snapshot
from udamon.core.session import SessionResult
from udamon.errors import UsageError
from udamon.schemes.numa_migrate import PAGE, Action, MigrateParams, apply
from udamon.units import fmt_size, parse_size

DESCRIPTION = """\
Monitor a process live (node breakdown on) and, every aggregation interval,
move the pages of hot regions that are accessed mostly from another NUMA node
to that node, with move_pages(2).  A region qualifies when its node probes
saw at least --min-hits sampling intervals with an access and one node made
at least --min-share of them; hottest regions go first, and at most --quota
bytes move per interval.  --dry-run only says what would move.

The target keeps its data (the kernel copies each page); pages that cannot
move (shared with another process, pinned) are counted by reason and stay.
The migration changes nothing system-wide; the primitive may (see below), and
restores it.
"""

EPILOG = """\
examples:
  udamon migrate --pid 1234 --duration 60s --dry-run
  udamon migrate --pid 1234 --quota 256MiB --min-share 0.8 -o migrate.jsonl
  udamon migrate --duration 30s -- ./numa_program

Each interval that moves something prints one line; the end prints the
totals (--format json: one JSON object with every interval's actions)."""


def _share(text: str) -> float:
    v = float(text)
    if not 0.5 <= v <= 1.0:
        raise ValueError("--min-share must be within 0.5..1")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError("must be at least 1")
    return v


def _quota(text: str) -> int:
    v = parse_size(text)
    if v < PAGE:
        raise ValueError(f"--quota must be at least one page ({PAGE} bytes)")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("migrate", help="move hot, remotely accessed memory to the node using it",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("migration")
    g.add_argument("--quota", metavar="SIZE", type=typed(_quota, "size"), default=64 << 20,
                   help="at most this much memory moves per aggregation interval (default 64MiB)")
    g.add_argument("--min-share", metavar="R", type=typed(_share, "share"), default=0.6,
                   help="a region moves to node N when N made at least this share of its "
                        "accesses (0.5..1, default 0.6)")
    g.add_argument("--min-hits", metavar="N", type=typed(_positive_int, "count"), default=2,
                   help="... and its node probes saw at least N sampling intervals with an "
                        "access in the interval (default 2)")
    g.add_argument("--dry-run", action="store_true",
                   help="move nothing: locate the pages and say what would move")
    g.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: a line per interval that acts and the totals; json: one object")
    g.add_argument("-o", "--output", metavar="FILE",
                   help="also write the record of the session (as 'udamon record' does)")
    live.add_session_args(p, replay=False, acts=True)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    s = live.resolve(a, replay=False)
    if "kernel" in s.primitive.split(","):
        raise UsageError("udamon migrate needs the node of every access, which the kernel's "
                         "DAMON cannot tell (use --primitive hint)")
    s.kinds = [*s.kinds, *(k for k in ("node", "numa") if k not in s.kinds)]
    params = MigrateParams(quota_bytes=a.quota, min_hits=a.min_hits, min_share=a.min_share,
                           dry_run=a.dry_run)
    if _single_node(a, params, s):
        return 0
    sinks: list[live.Sink] = [MigrateSink(params, a.format, a.quiet)]
    if a.output:
        from udamon.record.sink import RecordSink

        sinks.append(RecordSink(a.output, a.quiet))
    return live.run_session(a, s, sinks)


def _single_node(a: argparse.Namespace, params: MigrateParams, spec: live.SessionSpec) -> bool:
    """On a machine whose memory is all on one node nothing can ever move: say so at
    once.  With --pid targets and no -o there is nothing to do: True (the totals say
    why); with -o (a record is still worth writing) or a command to launch, the
    session runs, monitoring only."""
    from udamon.errors import TargetGone, UsageError
    from udamon.targets.page_nodes import memory_nodes
    from udamon.targets.procmaps import read_vmas

    nodes = memory_nodes()
    if len(nodes) > 1:
        return False
    where = f"node {nodes[0]}" if nodes else "one node"
    why = (f"this machine has one NUMA node with memory ({where}): there is no other node "
           "to move memory to")
    if a.output or spec.command or not spec.pids:
        print(f"udamon: note: {why}; monitoring only", file=sys.stderr)
        return False
    for pid in spec.pids:  # bad targets are still bad input
        try:
            read_vmas(pid)
        except TargetGone as e:
            raise UsageError(str(e)) from None
    if a.format == "json":
        tot = MigrateSink(params, "json", True).totals()
        json.dump({**tot, "reason": "single-node", "why": why}, sys.stdout)
        sys.stdout.write("\n")
    else:
        verb = "would move" if params.dry_run else "moves"
        print(f"udamon migrate: nothing {verb}: {why}", file=sys.stderr)
    return True


def remote_hits(snap: Snapshot) -> tuple[float, float]:
    """(remote reports, reports whose locality is known) of the snapshot: the exact
    counts from each report's page node (``Snapshot.numa``), region boundaries aside."""
    if snap.numa is None:
        return 0.0, 0.0
    return float(snap.numa["remote"]), float(snap.numa["remote"] + snap.numa["local"])


class MigrateSink:
    """Runs the scheme on every snapshot of a live session and reports what it did."""

    def __init__(self, params: MigrateParams, fmt: str, quiet: bool, out=None) -> None:
        self.params = params
        self.fmt = fmt
        self.quiet = quiet
        self.out = out or sys.stdout
        self.actions: list[Action] = []
        self.shares: list[tuple[int, int, float]] = []  # time_ns, pid, remote share
        self.errors: list[str] = []
        self._t0: int | None = None
        self._moved = False
        self._before = [0.0, 0.0]  # remote, total hits up to and including the first move

    def begin(self, header: dict, monitor: Monitor) -> None:
        pass

    def snapshot(self, snap: Snapshot) -> None:
        self._t0 = snap.start_ns if self._t0 is None else self._t0
        remote, total = remote_hits(snap)
        if total:
            self.shares.append((snap.time_ns, snap.pid, remote / total))
        if not self._moved:
            self._before[0] += remote
            self._before[1] += total
        try:
            act = apply(snap, self.params)
        except OSError as e:  # the process is gone, or move_pages is not permitted
            if len(self.errors) < 5:
                self.errors.append(f"pid {snap.pid}: move_pages: {e.strerror}")
            return
        self.actions.append(act)
        self._moved = self._moved or bool(act.pages_moved) and not self.params.dry_run
        if self.fmt == "text" and not self.quiet and (act.pages_moved or act.pages_failed):
            self._line(act)

    def _line(self, act: Action) -> None:
        t = (act.time_ns - (self._t0 or act.time_ns)) / 1e9
        to = sorted({r["to_node"] for r in act.regions if r["pages_moved"]})
        verb = "would move" if self.params.dry_run else "moved"
        msg = (f"{t:7.1f}s pid {act.pid}: {verb} {fmt_size(act.bytes_moved)} "
               f"({act.pages_moved} pages) of {sum(1 for r in act.regions if r['pages_moved'])} "
               f"region(s) to node {','.join(map(str, to)) or '-'}")
        if act.pages_failed:
            msg += "; could not move " + ", ".join(f"{n} ({k})" for k, n in
                                                   sorted(act.pages_failed.items()))
        print(msg, file=self.out, flush=True)

    def totals(self) -> dict:
        moved_to: dict[str, int] = {}
        failed: dict[str, int] = {}
        for act in self.actions:
            for r in act.regions:
                if r["pages_moved"]:
                    k = str(r["to_node"])
                    moved_to[k] = moved_to.get(k, 0) + r["pages_moved"] * PAGE
            for k, n in act.pages_failed.items():
                failed[k] = failed.get(k, 0) + n
        shares = [s for _, _, s in self.shares]
        third = max(1, len(shares) // 3)
        return {
            "dry_run": self.params.dry_run,
            "quota_bytes": self.params.quota_bytes,
            "min_share": self.params.min_share,
            "min_hits": self.params.min_hits,
            "intervals": len(self.actions),
            "intervals_acting": sum(1 for a in self.actions if a.pages_moved),
            "bytes_moved": sum(a.bytes_moved for a in self.actions),
            "bytes_moved_to_node": moved_to,
            "pages_failed": failed,
            # by each report's page node: share of the accesses that were remote
            "remote_share_first": float(np.mean(shares[:third])) if shares else None,
            "remote_share_last": float(np.mean(shares[-third:])) if shares else None,
            # pooled over the intervals up to and including the first that moved pages
            "remote_share_before_first_move": (self._before[0] / self._before[1]
                                               if self._moved and self._before[1] else None),
            "errors": self.errors,
        }

    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None:
        tot = self.totals()
        if self.fmt == "json":
            tot["reason"] = res.reason
            tot["actions"] = [a.to_dict() for a in self.actions if a.pages_moved or a.pages_failed]
            json.dump(tot, self.out)
            self.out.write("\n")
            return
        if self.quiet:
            return
        verb = "would have moved" if self.params.dry_run else "moved"
        per = ", ".join(f"{fmt_size(b)} to node {n}" for n, b in sorted(tot["bytes_moved_to_node"]
                                                                        .items()))
        lines = [f"udamon migrate: {verb} {fmt_size(tot['bytes_moved'])} in "
                 f"{tot['intervals_acting']} of {tot['intervals']} intervals"
                 + (f" ({per})" if per else "") + f"; stopped: {res.reason}"]
        if tot["pages_failed"]:
            lines.append("  pages that could not move: " + ", ".join(
                f"{n} ({k})" for k, n in sorted(tot["pages_failed"].items())))
        if tot["remote_share_first"] is not None:
            lines.append(f"  remote share of accesses (each report's page node): "
                         f"{tot['remote_share_first']:.0%} in the first third of the run, "
                         f"{tot['remote_share_last']:.0%} in the last")
        lines.extend(f"  error: {e}" for e in tot["errors"])
        print("\n".join(lines), file=self.out, flush=True)

    def fail(self, error: str) -> None:
        pass
