"""The record file contract (DESIGN.md, "Record file").

JSON Lines, optionally gzip-compressed.  Line 1: header.  Then one line per
target per aggregation (a snapshot).  A final ``{"end": {...}}`` line closes a
complete record.  Other tools rely on these names: add keys, never rename.
"""

FORMAT_NAME = "udamon-record"
FORMAT_VERSION = 1

HEADER_KEYS = ("format", "version", "attrs", "primitive", "filters", "probes", "targets")
SNAPSHOT_KEYS = ("time_ns", "pid", "sample_us", "regions")
# what an estimator adds to its snapshots (udamon dirty-rate, udamon ksm-advise), kept
# by the reader as it is (Snapshot.extra) for its report to read
ESTIMATE_KEYS = ("dirty", "ksm")
END_KEYS = ("reason", "dropped_reports", "lost_samples")

# Reasons a record ends with.
END_REASONS = (
    "duration",  # --duration elapsed
    "input-exhausted",  # replay input fully consumed
    "targets-exited",  # every target process exited
    "interrupted",  # SIGINT / SIGTERM
    "stopped",  # a library caller closed the writer
    "error",  # a runtime failure; see "error" in the end object
)

GZIP_MAGIC = b"\x1f\x8b"
