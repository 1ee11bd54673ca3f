"""A small pinned workload with known ground truth, for the demo and for trying udamon.

Thread "reader" (pinned to CPU A) reads buffer R and reads buffer S; thread
"writer" (pinned to CPU B) writes buffer W and writes S; buffer I is written
once at start and then left alone.  numpy releases the GIL during the bulk
reads and writes, so both threads really run at once.  Prints one JSON line
with the pid, thread ids and buffer address ranges, then runs until
--duration ends or SIGTERM; exits 0 when W and S hold what was written.

    python -m udamon.workloads.pinned --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

import numpy as np

MiB = 1 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds to run (default 10)")
    p.add_argument("--size", type=int, default=16, help="MiB per buffer (default 16)")
    p.add_argument("--reader-cpu", type=int, default=0)
    p.add_argument("--writer-cpu", type=int, default=1 if (os.cpu_count() or 1) > 1 else 0)
    a = p.parse_args()
    n = a.size * MiB
    # one mapping, four buffers in a row (I, S, W, R), like the C test workload
    block = np.zeros(4 * n, dtype=np.uint8)
    block[:] = 1  # touch everything: populated, then I is left alone
    bufs = {name: block[i * n:(i + 1) * n] for i, name in enumerate("ISWR")}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tids: dict[str, int] = {}
    ready = threading.Barrier(3)
    passes = {"reader": 0, "writer": 0}

    def reader():
        os.sched_setaffinity(0, {a.reader_cpu})
        tids["reader"] = threading.get_native_id()
        ready.wait()
        while not stop.is_set():
            bufs["R"].sum(dtype=np.uint64)
            bufs["S"].sum(dtype=np.uint64)
            passes["reader"] += 1

    def writer():
        os.sched_setaffinity(0, {a.writer_cpu})
        tids["writer"] = threading.get_native_id()
        ready.wait()
        k = 0
        while not stop.is_set():
            k = (k + 1) % 200 + 2
            bufs["W"].fill(k)
            bufs["S"].fill(k)
            passes["writer"] += 1
        tids["last"] = k

    ts = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in ts:
        t.start()
    ready.wait()
    base = block.ctypes.data
    info = {"event": "start", "pid": os.getpid(), "reader_tid": tids["reader"],
            "writer_tid": tids["writer"], "reader_cpu": a.reader_cpu,
            "writer_cpu": a.writer_cpu}
    for i, name in enumerate("ISWR"):
        info[name] = [base + i * n, base + (i + 1) * n]
    print(json.dumps(info), flush=True)
    stop.wait(a.duration)
    stop.set()
    for t in ts:
        t.join()
    k = tids.get("last", 1)
    intact = bool((bufs["W"] == k).all() and (bufs["S"] == k).all() and (bufs["R"] == 1).all())
    print(json.dumps({"event": "end", **passes, "intact": intact}), flush=True)
    return 0 if intact else 3


if __name__ == "__main__":
    raise SystemExit(main())
