"""Applying a placement's CPU masks to a live process's threads, and undoing it.

Never blindly: a mask is set only on the thread the plan was made for (same tid *and*
start time, in the same process), only when its mask is still the one the plan saw,
and only after the undo record holding its previous mask is on disk.  Threads that
appeared since the plan are reported and left alone; threads that left are reported.
``undo`` sets the previous masks back on the threads that still have the mask udamon
set (or on all of them with ``force``), and reports the others.

The undo record (JSON, written before the first mask is set, rewritten with the
outcome afterwards)::

    {"format": "udamon-place-undo", "version": 1, "pid": P, "pid_starttime": S,
     "comm": "...", "created": "ISO time", "complete": true|false,
     "threads": [{"tid": T, "starttime": S, "comm": "...", "previous": [cpus],
                  "applied": [cpus], "status": "set" | "pending" | "left" | ...}]}
"""

from __future__ import annotations

import datetime
import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from udamon.errors import InputError, RuntimeFailure, TargetGone, UsageError
from udamon.targets.threads import get_mask, list_threads, read_stat, set_mask
from udamon.targets.topology import format_cpulist

UNDO_FORMAT = "udamon-place-undo"
UNDO_VERSION = 1


@dataclass(frozen=True)
class Planned:
    """One mask to set: on thread (tid, starttime), from ``mask`` (as planned) to ``new``."""

    tid: int
    starttime: int
    comm: str
    mask: frozenset[int]
    new: frozenset[int]


@dataclass
class Outcome:
    tid: int
    comm: str
    status: str  # set, unchanged, left, exited, changed, failed, would-set, restored, ...
    detail: str = ""
    previous: frozenset[int] | None = None
    mask: frozenset[int] | None = None  # what the thread has afterwards

    def to_dict(self) -> dict:
        return {"tid": self.tid, "comm": self.comm, "status": self.status,
                "detail": self.detail,
                "previous": None if self.previous is None else format_cpulist(self.previous),
                "mask": None if self.mask is None else format_cpulist(self.mask)}


@dataclass
class Result:
    outcomes: list[Outcome] = field(default_factory=list)
    appeared: list[tuple[int, str]] = field(default_factory=list)  # (tid, comm), untouched
    undo_path: str | None = None

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_dict(self) -> dict:
        return {"threads": [o.to_dict() for o in self.outcomes],
                "appeared": [{"tid": t, "comm": c} for t, c in self.appeared],
                "undo_record": self.undo_path}


def pid_starttime(pid: int) -> int:
    st = read_stat(pid, pid)
    if st is None:
        raise TargetGone(f"process {pid} does not exist (or has exited)")
    return st.starttime


def _same_thread(pid: int, tid: int, starttime: int) -> bool:
    st = read_stat(pid, tid)
    return st is not None and st.starttime == starttime


def _check_process(pid: int, starttime: int | None) -> None:
    now = pid_starttime(pid)
    if starttime is not None and now != starttime:
        raise RuntimeFailure(f"process {pid} is not the process the plan was made for "
                             "(it exited and the pid was reused); nothing was changed")


def _write_json(path: str, doc: dict, *, exclusive: bool) -> None:
    """Write ``doc`` durably: a new file (refusing to replace one) or an atomic rewrite."""
    data = (json.dumps(doc, indent=1) + "\n").encode()
    if exclusive:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise UsageError(f"undo record {path} exists already: it may hold masks still to "
                             "restore; restore them (--undo) or choose another file "
                             "(--undo-record)") from None
        except OSError as e:
            raise UsageError(f"cannot write the undo record {path}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def apply(pid: int, pid_start: int | None, planned: list[Planned],
          known: dict[int, tuple[int, str]], *, undo_path: str | None, dry_run: bool,
          before_set: Callable[[Planned], None] | None = None) -> Result:
    """Set the planned masks.  ``known``: every thread the plan knew about, moved or
    not (tid -> (start time, comm)), so that threads which appeared or left since are
    reported.  ``undo_path`` is required unless ``dry_run``.  ``before_set`` is called
    with each thread just before its identity is checked and its mask set (tests make
    a thread exit there)."""
    _check_process(pid, pid_start)
    res = Result(undo_path=None if dry_run else undo_path)
    try:
        now = list_threads(pid)
    except TargetGone:
        raise RuntimeFailure(f"process {pid} exited before its masks were set") from None
    for tid, st in now.items():
        if tid not in known or st.starttime != known[tid][0]:
            res.appeared.append((tid, st.comm))
    moving = {p.tid for p in planned}
    for tid, (start, comm) in known.items():
        st = now.get(tid)
        if tid not in moving and (st is None or st.starttime != start):
            res.outcomes.append(Outcome(tid, comm, "left", "the thread exited since the plan "
                                        "(it was not to be moved)"))
    todo: list[tuple[Planned, frozenset[int]]] = []
    for p in planned:
        st = now.get(p.tid)
        if st is None or st.starttime != p.starttime:
            res.outcomes.append(Outcome(p.tid, p.comm, "left", "the thread exited since the "
                                        "plan" + (" (its tid is now another thread's)"
                                                  if st is not None else "")))
            continue
        try:
            cur = get_mask(p.tid)
        except ProcessLookupError:
            res.outcomes.append(Outcome(p.tid, p.comm, "left", "the thread exited since the plan"))
            continue
        if cur != p.mask:
            res.outcomes.append(Outcome(p.tid, p.comm, "changed",
                                        f"its mask changed since the plan (planned from "
                                        f"{format_cpulist(p.mask)}, now {format_cpulist(cur)}): "
                                        "left as it is", cur, cur))
            continue
        if cur == p.new:
            res.outcomes.append(Outcome(p.tid, p.comm, "unchanged", "already has that mask",
                                        cur, cur))
            continue
        todo.append((p, cur))
    if dry_run:
        for p, cur in todo:
            res.outcomes.append(Outcome(p.tid, p.comm, "would-set", "", cur, p.new))
        return res
    if not todo:
        return res
    assert undo_path is not None
    doc = {"format": UNDO_FORMAT, "version": UNDO_VERSION, "pid": pid,
           "pid_starttime": pid_start if pid_start is not None else pid_starttime(pid),
           "comm": now.get(pid).comm if pid in now else "",
           "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "complete": False,
           "threads": [{"tid": p.tid, "starttime": p.starttime, "comm": p.comm,
                        "previous": sorted(cur), "applied": sorted(p.new),
                        "status": "pending"} for p, cur in todo]}
    _write_json(undo_path, doc, exclusive=True)  # before the first mask changes
    for k, (p, cur) in enumerate(todo):
        entry = doc["threads"][k]
        if before_set is not None:
            before_set(p)
        if not _same_thread(pid, p.tid, p.starttime):
            res.outcomes.append(Outcome(p.tid, p.comm, "exited", "the thread exited during "
                                        "the apply; not touched"))
            entry["status"] = "left"
            continue
        try:
            set_mask(p.tid, p.new)
            got = get_mask(p.tid)
        except ProcessLookupError:
            res.outcomes.append(Outcome(p.tid, p.comm, "exited",
                                        "the thread exited during the apply"))
            entry["status"] = "left"
            continue
        except OSError as e:
            why = ("none of the CPUs is in its cpuset" if e.errno == errno.EINVAL else
                   "not permitted (needs CAP_SYS_NICE or the same user)"
                   if e.errno == errno.EPERM else e.strerror)
            res.outcomes.append(Outcome(p.tid, p.comm, "failed", f"sched_setaffinity: {why}",
                                        cur, cur))
            entry["status"] = "failed"
            continue
        entry["applied"] = sorted(got)
        entry["status"] = "set"
        res.outcomes.append(Outcome(p.tid, p.comm, "set", "" if got == p.new else
                                    f"the kernel kept {format_cpulist(got)} (its cpuset)",
                                    cur, got))
    doc["complete"] = True
    _write_json(undo_path, doc, exclusive=False)
    return res


def read_undo(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != UNDO_FORMAT:
        raise InputError(f"{path}: not an undo record of 'udamon place --apply' "
                         f"(format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != UNDO_VERSION:
        raise InputError(f"{path}: undo record version {doc.get('version')!r} is not supported "
                         f"(this udamon reads {UNDO_VERSION})")
    try:
        int(doc["pid"])
        int(doc["pid_starttime"])
        for t in doc["threads"]:
            int(t["tid"])
            int(t["starttime"])
            [int(c) for c in t["previous"]]
            [int(c) for c in t["applied"]]
            str(t["status"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed undo record ({type(e).__name__}: {e})") from None
    return doc


def undo(path: str, *, force: bool = False, dry_run: bool = False) -> Result:
    """Restore the previous masks of an undo record."""
    doc = read_undo(path)
    pid = int(doc["pid"])
    res = Result(undo_path=path)
    try:
        _check_process(pid, int(doc["pid_starttime"]))
    except TargetGone:
        raise RuntimeFailure(f"process {pid} of {path} has exited: there is nothing to "
                             "restore") from None
    for t in doc["threads"]:
        tid, comm = int(t["tid"]), str(t.get("comm", ""))
        prev = frozenset(int(c) for c in t["previous"])
        applied = frozenset(int(c) for c in t["applied"])
        if t["status"] not in ("set", "pending"):
            res.outcomes.append(Outcome(tid, comm, "not-applied",
                                        f"its mask was not set ({t['status']})"))
            continue
        if not _same_thread(pid, tid, int(t["starttime"])):
            res.outcomes.append(Outcome(tid, comm, "left", "the thread has exited"))
            continue
        try:
            cur = get_mask(tid)
        except ProcessLookupError:
            res.outcomes.append(Outcome(tid, comm, "left", "the thread has exited"))
            continue
        if cur == prev:
            res.outcomes.append(Outcome(tid, comm, "unchanged", "has its previous mask already",
                                        cur, cur))
            continue
        if cur != applied and not force:
            res.outcomes.append(Outcome(tid, comm, "changed",
                                        f"its mask changed since the apply ({format_cpulist(cur)}"
                                        f", udamon set {format_cpulist(applied)}): left as it "
                                        "is (--force restores it anyway)", cur, cur))
            continue
        if dry_run:
            res.outcomes.append(Outcome(tid, comm, "would-restore", "", cur, prev))
            continue
        try:
            set_mask(tid, prev)
            got = get_mask(tid)
        except ProcessLookupError:
            res.outcomes.append(Outcome(tid, comm, "left", "the thread exited during the undo"))
            continue
        except OSError as e:
            res.outcomes.append(Outcome(tid, comm, "failed", f"sched_setaffinity: {e.strerror}",
                                        cur, cur))
            continue
        res.outcomes.append(Outcome(tid, comm, "restored" if got == prev else "failed",
                                    "" if got == prev else
                                    f"the kernel kept {format_cpulist(got)} (its cpuset changed)",
                                    cur, got))
    return res
