"""RecordSink: a session's snapshots into a record file, closed with its end line."""

from __future__ import annotations

import sys
from typing import TextIO

from udamon.core.loop import SessionResult
from udamon.core.monitor import Monitor
from udamon.record.writer import RecordWriter


class RecordSink:
    """Writes a session's record (``begin``: header, ``snapshot``: one line each, ``end``:
    the end line with the monitor's counts); says what it wrote on ``out`` unless
    ``quiet``.  ``fail`` closes an unfinished record with reason ``error``."""

    def __init__(self, path: str, quiet: bool = False, out: TextIO | None = None):
        self.path = path
        self.quiet = quiet
        self.out = out
        self.writer: RecordWriter | None = None

    def begin(self, header: dict, monitor: Monitor) -> None:
        self.writer = RecordWriter(self.path)
        self.writer.write_header(header)

    def snapshot(self, snap) -> None:
        assert self.writer is not None
        self.writer.write_snapshot(snap)

    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None:
        assert self.writer is not None
        finish(self.writer, monitor, res, self.quiet, notes=notes, out=self.out)

    def fail(self, error: str) -> None:
        if self.writer is not None and not self.writer.closed:
            self.writer.close("error", error=error)


def finish(writer: RecordWriter, monitor: Monitor, res: SessionResult, quiet: bool,
           notes: list[str] | None = None, out: TextIO | None = None) -> int:
    """Close the record with the end line; one summary line on ``out`` (stderr)."""
    st = monitor.stats
    extra = {"reports": st.accepted, "unmatched_reports": st.unmatched,
             "outside_reports": st.outside, "late_reports": st.late}
    extra.update(res.end)
    if notes:
        extra["notes"] = notes
    if res.error:
        extra["error"] = res.error
    writer.close(res.reason, dropped_reports=st.dropped, lost_samples=res.lost_samples, **extra)
    if not quiet:
        msg = (f"udamon: wrote {writer.snapshots} snapshots to {writer.path} "
               f"({res.reason}; {st.accepted} reports")
        if st.dropped:
            msg += f", {st.dropped} DROPPED (buffer full)"
        if res.lost_samples:
            msg += f", {res.lost_samples} lost before udamon read them"
        print(msg + ")", file=out or sys.stderr)
    return 0
