"""One poll() over descriptors and a wake-up descriptor: the observational primitives'
and the report channel's ``wait``.  The wake-up descriptor is a live session's stop
flag, so that a wait of a whole latency still ends at once on a stop."""

from __future__ import annotations

import math
import select
import time


def wait_fds(fds: list[int], timeout_s: float, wake_fd: int = -1) -> bool:
    """poll() ``fds`` and ``wake_fd`` for input up to ``timeout_s`` (rounded up to whole
    milliseconds: rounding down woke callers early, and they spun on poll(0) until
    their deadline); True when one of ``fds`` is readable."""
    ms = max(0, math.ceil(timeout_s * 1000))
    if not fds and wake_fd < 0:
        time.sleep(ms / 1000)
        return False
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    if wake_fd >= 0:
        p.register(wake_fd, select.POLLIN)
    return any(fd != wake_fd for fd, _ in p.poll(ms))
