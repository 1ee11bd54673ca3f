"""The Primitive contract, checked on every live primitive this machine can run.

Each one is made through the registry (as a session makes it), started on the pinned
workload and driven the way the core loop drives its kind: a controlled primitive
runs sampling windows over pages of the workload's buffers, an observational one is
waited on and polled, a regions one (the kernel's DAMON) is waited on and hands over
aggregations of its target.  Then the target exits and the primitive must say so, its
stats must be well formed, and ``stop()`` must be safe twice.  A primitive this
machine lacks is skipped with the registry's own reason.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import start_workload

from udamon import REPORT_DTYPE, Attrs
from udamon.core.loop import SessionResult  # noqa: F401 - the loop this contract serves
from udamon.primitives import registry
from udamon.primitives.base import PrimitiveStats, Window

LIVE = [n for n, e in registry.ENTRIES.items() if e.live]
PAGE = 4096


def _options(name: str, tmp_path) -> dict:
    return {"socket_path": str(tmp_path / "c.sock"), "stdin": False} if name == "external" \
        else {}


def _drive(prim, info: dict, rounds: int) -> np.ndarray:
    """A few intervals of the core loop's calls for the primitive's kind."""
    pid = info["pid"]
    got = []
    if prim.kind == "controlled":
        # one "region" per buffer: a page of each, a new page every turn
        bases = np.array([info[b][0] for b in "RWSI"], dtype=np.uint64)
        turns = 10
        for k in range(rounds):
            plan = np.stack([bases + np.uint64(((k * turns + t) % 64) * PAGE)
                             for t in range(turns)])
            w = Window(time.monotonic_ns(), 5_000_000, {pid: plan})
            reports, nxt = prim.sample_window(w)
            assert 0 <= nxt <= w.turns
            got.append(reports)
    elif prim.kind == "regions":
        aggs = []
        for _ in range(rounds * 5):
            prim.wait(0.05)
            aggs += prim.aggregations()
            got.append(prim.poll(time.monotonic_ns()))
        for a in aggs:  # whole aggregations of its target, as the monitor takes them
            assert a.pid == pid and a.end_ns > a.start_ns and len(a.start) > 0
            assert (a.start < a.end).all() and (a.end[:-1] <= a.start[1:]).all()
            assert (a.nr_accesses >= 0).all() and (a.age >= 0).all()
    else:
        for _ in range(rounds * 5):
            prim.wait(0.02)
            got.append(prim.poll(time.monotonic_ns()))
    out = np.concatenate(got) if got else np.empty(0, dtype=REPORT_DTYPE)
    assert out.dtype == REPORT_DTYPE
    return out


@pytest.mark.parametrize("name", LIVE)
def test_every_available_primitive_keeps_the_contract(name, access_pattern_bin, tmp_path):
    e = registry.entry(name)
    ok, why = e.available()
    if not ok:
        pytest.skip(f"{name} is not available here: {why}")
    attrs = Attrs(sample_us=e.default_sample_us, aggr_us=e.default_aggr_us)
    prim = registry.make_live(name, attrs, **_options(name, tmp_path))
    assert prim.name == name and prim.kind in ("observational", "controlled", "regions")
    assert prim.coverage in ("controlled", "complete", "unknown")
    # killed below; long enough that it cannot end first in a slow guest (its last act,
    # checking every buffer, would be an access the test did not plan)
    wl, info = start_workload(access_pattern_bin, "--duration", "600", "--size", "4")
    try:
        prim.start([info["pid"]])
        assert prim.gone_at_start() == []
        reports = _drive(prim, info, 3)
        if reports.size:  # what a primitive reports is about its target
            assert set(np.unique(reports["pid"]).tolist()) <= {info["pid"]}
        if name in ("rwp", "wp"):  # controlled: the writer's pages are written every pass
            assert (reports["write"] == 1).any(), "no write seen in 30 armed turns"
        assert prim.exited() == []
        wl.kill()
        wl.wait()
        deadline = time.monotonic() + 10
        gone: list[int] = []
        while not gone and time.monotonic() < deadline:
            _drive(prim, info, 1) if prim.kind != "controlled" else time.sleep(0.05)
            gone = prim.exited()
        assert gone == [info["pid"]], f"{name} never noticed its target exit"
        assert prim.exited() == []  # said once
        st = prim.stats()
        assert isinstance(st, PrimitiveStats) and st.lost_samples >= 0
        assert all(isinstance(n, str) and "\n" not in n for n in st.notes)
    finally:
        if wl.poll() is None:
            wl.kill()
            wl.wait()
        prim.stop()
        prim.stop()  # safe twice: every exit path of a session calls it
    if name == "external":
        assert not os.path.exists(tmp_path / "c.sock")  # its socket is removed
