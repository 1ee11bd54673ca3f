"""The NUMA-aware migration scheme (schemes/numa_migrate.py) and ``udamon migrate``.

On this one-node host: the selection logic on constructed snapshots, the page
accounting (dry run and the no-op of moving local pages) on a real process's
real buffer, and the CLI end to end.  Real moves between two nodes run in the
QEMU guest (tests/test_guest_numa.py::test_migrate_moves_remote_memory_home).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import run_udamon

from udamon.core.monitor import Snapshot
from udamon.primitives.hint import hint_available
from udamon.schemes.numa_migrate import MigrateParams, apply, candidates
from udamon.targets.page_nodes import query_nodes

MiB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (move_pages of a child)")


def snap(regions, pid=1, page_nodes=None) -> Snapshot:
    """regions: [(start, end, {node: hits})]"""
    nodes = sorted({n for _, _, h in regions for n in h})
    return Snapshot(
        time_ns=2_000_000_000, start_ns=1_900_000_000, pid=pid, sample_us=5000,
        start=np.asarray([r[0] for r in regions], dtype=np.uint64),
        end=np.asarray([r[1] for r in regions], dtype=np.uint64),
        nr_accesses=np.asarray([sum(r[2].values()) for r in regions], dtype=np.int64),
        age=np.zeros(len(regions), dtype=np.int64),
        probe_hits={f"node:{n}": np.asarray([r[2].get(n, 0) for r in regions], dtype=np.int64)
                    for n in nodes} | {"write": np.ones(len(regions), dtype=np.int64)},
        page_nodes=page_nodes)


def test_candidates_pick_hot_one_sided_regions_hottest_first():
    s = snap([(0x1000, 0x3000, {0: 10, 1: 0}),   # hot, all node 0
              (0x3000, 0x5000, {0: 3, 1: 3}),    # shared half and half: no
              (0x5000, 0x6000, {0: 1, 1: 0}),    # too cold for min_hits=2
              (0x6000, 0x9000, {0: 2, 1: 18}),   # hottest, 90% node 1
              (0x9000, 0xa000, {0: 4, 1: 2})],   # 67% node 0
             page_nodes=np.array([[0, 2], [1, 1], [0, 2], [2, 0], [2, 0]]))
    c = candidates(s, MigrateParams(min_hits=2, min_share=0.6))
    # the last region is accessed from node 0 and all its sampled pages are there: skipped
    assert [(x.start, x.to_node) for x in c] == [(0x6000, 1), (0x1000, 0)]
    assert c[0].hits == 20 and c[0].share == pytest.approx(0.9)
    # a stricter share keeps only the one-sided ones
    c = candidates(s, MigrateParams(min_hits=2, min_share=0.95))
    assert [x.start for x in c] == [0x1000]
    # without node probes there is nothing to decide on
    s2 = snap([(0x1000, 0x2000, {})])
    assert candidates(s2, MigrateParams()) == []


_HOLDER = textwrap.dedent("""
    import mmap, sys, hashlib
    size = int(sys.argv[1])
    m = mmap.mmap(-1, size)
    for i in range(0, size, 4096):
        m[i:i + 8] = i.to_bytes(8, "little")
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    print(addr, hashlib.sha256(m).hexdigest(), flush=True)
    sys.stdin.readline()
    print(hashlib.sha256(m).hexdigest(), flush=True)
""")


@pytest.fixture
def holder():
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(8 * MiB)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    addr, digest = p.stdout.readline().split()
    yield p, int(addr), digest
    p.kill()
    p.wait()


@needs_root
def test_apply_counts_and_respects_the_quota(holder):
    p, addr, digest = holder
    where = query_nodes(p.pid, np.arange(addr, addr + 8 * MiB, 4096, dtype=np.uint64))
    assert (where >= 0).all()
    here = int(np.bincount(where).argmax())
    other = here + 1  # not a node with memory here: only a dry run may aim at it
    s = snap([(addr, addr + 4 * MiB, {other: 9}), (addr + 4 * MiB, addr + 8 * MiB, {other: 5})],
             pid=p.pid)
    act = apply(s, MigrateParams(quota_bytes=5 * MiB, min_hits=1, dry_run=True))
    # hottest region first, whole; the next one cut to what is left of the quota
    assert [r["pages_moved"] for r in act.regions] == [1024, 256]
    assert act.pages_moved == 1280 and act.bytes_moved == 5 * MiB
    assert act.pages_local == 0
    # aimed at the node the pages are on: nothing to move, all counted as local
    s = snap([(addr, addr + 8 * MiB, {here: 9})], pid=p.pid)
    act = apply(s, MigrateParams(min_hits=1))
    assert act.pages_moved == 0 and act.pages_local == 2048 and not act.pages_failed
    # a node without memory: the kernel refuses the whole call, one clear error
    s = snap([(addr, addr + 4 * MiB, {other: 9})], pid=p.pid)
    with pytest.raises(OSError) as e:
        apply(s, MigrateParams(min_hits=1))
    assert e.value.errno == 19  # ENODEV
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == digest  # the data are untouched


def test_migrate_bad_input_is_one_line_and_exit_2():
    for args, text in ((["--quota", "0"], "at least one page"),
                       (["--min-share", "0.3"], "0.5..1"),
                       (["--min-hits", "0"], "at least 1"),
                       (["--quota", "lots"], "bad size"),
                       (["--primitive", "replay"], "invalid choice")):
        r = run_udamon("migrate", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


_ok, _why = hint_available() if os.geteuid() == 0 else (False, "not root")


@pytest.mark.skipif(not _ok, reason=f"hint unavailable: {_why}")
def test_migrate_cli_on_one_node_finds_nothing_remote(holder, tmp_path):
    p, addr, digest = holder
    out = tmp_path / "m.jsonl"
    r = run_udamon("migrate", "--pid", str(p.pid), "--duration", "3s", "--format", "json",
                   "--quiet", "-o", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["bytes_moved"] == 0 and res["intervals"] >= 20
    assert res["dry_run"] is False and res["quota_bytes"] == 64 * MiB
    assert res["remote_share_first"] in (None, 0.0)
    # the record was written too, with the node breakdown probes
    head = json.loads(out.read_text().splitlines()[0])
    assert any(pr["name"].startswith("node:") for pr in head["probes"])
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == digest
