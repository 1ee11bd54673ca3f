"""Record writer: header, one line per snapshot, end line.

Every snapshot line is flushed as it is written, so a record of a session that
was killed is still readable up to the last complete aggregation.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Sequence
from typing import IO

from udamon.core.attrs import Attrs
from udamon.core.monitor import Snapshot, Target
from udamon.core.session import describe
from udamon.errors import RuntimeFailure, UsageError
from udamon.probes.filters import Filter
from udamon.probes.probe import Probe
from udamon.record.format import END_REASONS, FORMAT_NAME, FORMAT_VERSION
from udamon.record.snapshot_json import NamesWritten, snapshot_line


def build_header(attrs: Attrs, primitive: str, coverage: str, filters: Sequence[Filter],
                 probes: Sequence[Probe], targets: Sequence[Target], **extra) -> dict:
    """A record's header line: the record format's name and version plus what the
    session says of itself (udamon.core.session.describe)."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION,
            **describe(attrs, primitive, coverage, filters, probes, targets, **extra)}


class RecordWriter:
    def __init__(self, path: str, *, compress: bool | None = None):
        self.path = path
        if compress is None:
            compress = path.endswith(".gz")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"cannot write {path}: directory {parent} does not exist")
        try:
            raw = open(path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror}") from None
        self._gz: gzip.GzipFile | None = None
        self._raw = raw
        if compress:
            self._gz = gzip.GzipFile(fileobj=raw, mode="wb")
            self._f: IO[bytes] = self._gz
        else:
            self._f = raw
        self.snapshots = 0
        self.closed = False
        self._header_written = False
        self._names = NamesWritten()  # mapping and thread names already in the record

    def _line(self, obj: dict | str) -> None:
        text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        data = (text + "\n").encode()
        try:
            self._f.write(data)
            if self._gz is not None:
                self._gz.flush(zlib.Z_SYNC_FLUSH)
            self._raw.flush()
        except OSError as e:
            raise RuntimeFailure(f"writing {self.path} failed: {e.strerror}") from None

    def write_header(self, header: dict) -> None:
        """The header line; the record format's name and version go first (a session's
        own description, udamon.core.session.describe, has neither)."""
        assert not self._header_written
        self._line({"format": FORMAT_NAME, "version": FORMAT_VERSION, **header})
        self._header_written = True
        self._names = NamesWritten(header)

    def write_snapshot(self, snap: Snapshot | dict) -> None:
        self._line(snapshot_line(snap, self._names) if isinstance(snap, Snapshot) else snap)
        self.snapshots += 1

    def close(self, reason: str = "stopped", *, dropped_reports: int = 0,
              lost_samples: int = 0, **extra) -> None:
        """Write the end line and close.  Idempotent."""
        if self.closed:
            return
        if reason not in END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}")
        end = {"reason": reason, "dropped_reports": int(dropped_reports),
               "lost_samples": int(lost_samples), "snapshots": self.snapshots}
        end.update(extra)
        try:
            self._line({"end": end})
        finally:
            self.closed = True
            if self._gz is not None:
                self._gz.close()
            self._raw.close()

    def abandon(self) -> None:
        """Close without an end line (the record stays visibly incomplete)."""
        if not self.closed:
            self.closed = True
            try:
                if self._gz is not None:
                    self._gz.close()
                self._raw.close()
            except OSError:
                pass
