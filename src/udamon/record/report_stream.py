"""Keeping a session's raw report stream beside its record (``udamon record
--keep-reports FILE``): every report an aggregation counted, page node included, as
the replay CSV (intake/csv_format), gzip-compressed.  A record keeps what its probes
and breakdowns counted; the stream keeps the reports themselves, so that any other
filter, probe or breakdown can be counted later: ``udamon record --input FILE``."""

from __future__ import annotations

import gzip
from typing import TYPE_CHECKING

import numpy as np

from udamon.errors import UsageError
from udamon.intake.csv_format import ALL_COLUMNS, format_rows

if TYPE_CHECKING:
    from udamon.core.monitor import Monitor
    from udamon.core.session import SessionResult


class ReportStreamSink:
    """A session sink: opens FILE at ``begin``, appends the reports of each aggregation
    as the monitor counts them, closes at ``end`` (also on failure: what was written is
    a valid stream up to there)."""

    def __init__(self, path: str, compresslevel: int = 1):
        self.path = path
        self.compresslevel = compresslevel
        self.reports = 0
        self._f = None

    def begin(self, header: dict, monitor: Monitor) -> None:
        try:
            self._f = gzip.open(self.path, "wt", encoding="ascii",
                                compresslevel=self.compresslevel)
        except OSError as e:
            raise UsageError(f"cannot write the report stream {self.path}: "
                             f"{e.strerror or e}") from None
        self._f.write(",".join(ALL_COLUMNS) + "\n")
        monitor.report_tap = self._write

    def _write(self, reports: np.ndarray) -> None:
        if self._f is not None:
            self._f.write(format_rows(reports))
            self.reports += int(reports.size)

    def snapshot(self, snap) -> None:
        pass

    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None:
        monitor.report_tap = None
        self._close()
        notes.append(f"kept {self.reports} reports in {self.path} (replay them with "
                     f"any filter, probe or breakdown: udamon record --input {self.path})")

    def fail(self, error: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
