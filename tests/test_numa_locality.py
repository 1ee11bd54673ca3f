"""NUMA locality per report: page nodes, the local/remote filters, --breakdown numa,
regions that follow origin, and report numa's exact counts.

Replayed input with a ``page_node`` column: four adjacent, equally hot 8 MiB
buffers A B C D; A is accessed from node 0 but lives on node 1 (remote), B from
node 1 on node 1 (local), C from node 0 on node 0 (local), D from node 1 on node 0
(remote).  Every expectation is exact or derived from that layout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_udamon

import udamon
from udamon import Attrs, Monitor, Probe
from udamon.probes.filters import Filter, evaluate, evaluate_reference, parse_conditions

MiB = 1 << 20
BASE = 0x7F00_0000_0000
BUF = 8 * MiB
# name -> (cpu, cpu node, page node, thread)
LAYOUT = {"A": (0, 0, 1, 100), "B": (1, 1, 1, 101), "C": (2, 0, 0, 102), "D": (3, 1, 0, 103)}
TRUTH_REMOTE = {"A": 1.0, "B": 0.0, "C": 0.0, "D": 1.0}


def _reports(seconds: float = 6.0, per_ms: int = 16, seed: int = 1) -> np.ndarray:
    """Each buffer gets ``per_ms`` reports per millisecond at random pages: equally hot."""
    rng = np.random.default_rng(seed)
    parts = []
    n = int(seconds * 1000 * per_ms)
    for i, (cpu, node, pnode, tid) in enumerate(LAYOUT.values()):
        lo = BASE + i * BUF
        parts.append(udamon.make_reports(
            time_ns=rng.integers(0, int(seconds * 1e9), n), pid=42, tid=tid, cpu=cpu,
            node=node, addr=lo + (rng.integers(0, BUF // 4096, n) * 4096).astype(np.uint64),
            page_node=pnode, write=rng.random(n) < 0.5))
    r = np.concatenate(parts)
    return r[np.argsort(r["time_ns"], kind="stable")]


def _csv(path, reports: np.ndarray) -> None:
    cols = ("time_ns", "pid", "tid", "cpu", "node", "addr", "size", "write", "page_node")
    with open(path, "w") as f:
        f.write(",".join(cols) + "\n")
        rows = np.column_stack([reports[c].astype(np.int64) if c != "addr" else reports[c]
                                for c in cols])
        np.savetxt(f, rows, fmt="%d", delimiter=",")


def test_local_and_remote_filters_follow_the_page_node():
    r = udamon.make_reports(time_ns=0, pid=1, addr=0x1000, cpu=[0, 1, 2, 3, 4],
                            node=[0, 1, 0, -1, 1], page_node=[0, 0, -1, 0, 1])
    local, remote = parse_conditions("local"), parse_conditions("remote")
    assert evaluate(local, r).tolist() == [True, False, False, False, True]
    assert evaluate(remote, r).tolist() == [False, True, False, False, False]
    # unknown never matches either, so !local keeps the unknown ones
    assert evaluate(parse_conditions("!local"), r).tolist() == [False, True, True, True, False]
    pn = parse_conditions("page_nodes:1")
    assert evaluate(pn, r).tolist() == [False, False, False, False, True]
    for f in (local, remote, pn, [Filter("remote", matching=False, allow=True)]):
        assert [evaluate_reference(f, x) for x in r] == evaluate(f, r).tolist()


def test_snapshots_count_local_and_remote_reports_exactly():
    reps = _reports(1.0)
    mon = Monitor(Attrs(aggr_us=500_000), probes=[Probe.parse("remote=remote")], seed=2)
    mon.add_target(42, [(BASE, BASE + 4 * BUF)])
    mon.start(0)
    mon.report_batch(reps)
    snaps = mon.advance(1_000_000_000)
    assert len(snaps) == 2
    tot = {k: sum(s.numa[k] for s in snaps) for k in ("local", "remote", "unknown")}
    n = reps.size // 4
    assert tot == {"local": 2 * n, "remote": 2 * n, "unknown": 0}
    for name, (_, _, _, tid) in LAYOUT.items():
        got = [0, 0, 0]
        for s in snaps:
            got = [a + b for a, b in zip(got, s.numa["threads"][str(tid)], strict=True)]
        assert got == ([0, n, 0] if TRUTH_REMOTE[name] else [n, 0, 0])
    # the regions' pages: every reported page of a buffer is on its page node
    for s in snaps:
        for i, d in enumerate(s.region_page_nodes()):
            mid = (int(s.start[i]) + int(s.end[i])) // 2
            buf = "ABCD"[min((mid - BASE) // BUF, 3)]
            if int(s.start[i]) >= BASE + "ABCD".index(buf) * BUF and int(s.end[i]) <= (
                    BASE + ("ABCD".index(buf) + 1) * BUF):
                assert set(d) <= {LAYOUT[buf][2]}


def _per_buffer_remote(numa_json: dict) -> dict[str, float]:
    """Remote share of each buffer from report numa's per-region local/remote."""
    regs = numa_json["targets"][0]["regions"]
    out = {}
    for i, name in enumerate("ABCD"):
        lo, hi = BASE + i * BUF, BASE + (i + 1) * BUF
        loc = rem = 0.0
        for r in regs:
            ov = max(0, min(hi, r["end"]) - max(lo, r["start"]))
            if ov:
                loc += r["local"] * ov / r["size"]
                rem += r["remote"] * ov / r["size"]
        out[name] = rem / (loc + rem) if loc + rem else float("nan")
    return out


@pytest.mark.parametrize("follow", [True, False], ids=["follow-origin", "no-follow"])
def test_report_numa_from_replayed_page_nodes(tmp_path, follow):
    """With regions following origin, each buffer's remote share comes out right from
    the per-region values; the target's local ratio is exact either way."""
    csv = tmp_path / "r.csv"
    _csv(csv, _reports())
    rec = tmp_path / "r.jsonl"
    run_udamon("record", "--input", str(csv), "-q", "--seed", "5", "--breakdown", "numa",
               "--regions", "10,200",
               "--regions-follow-origin" if follow else "--no-regions-follow-origin",
               "-o", str(rec), check=True)
    header = json.loads(open(rec).readline())
    weights = {p["name"]: p.get("weight", 0) for p in header["probes"]}
    assert weights == ({"local": 1, "remote": 1} if follow else {"local": 0, "remote": 0})
    p = run_udamon("report", "numa", "-i", str(rec), "--format", "json", check=True)
    j = json.loads(p.stdout)
    t = j["targets"][0]
    assert t["local_ratio"] == 0.5  # exact: half the reports are local
    assert t["reports"]["unknown"] == 0
    for name, (_, _, _, tid) in LAYOUT.items():
        th = t["threads"][str(tid)]
        assert th["local_ratio"] == (0.0 if TRUTH_REMOTE[name] else 1.0)
    share = _per_buffer_remote(j)
    print(share)
    if follow:
        for name, truth in TRUTH_REMOTE.items():
            assert abs(share[name] - truth) <= 0.1, (name, share)
    else:  # equally hot neighbours merge: some buffer's answer is blurred
        assert any(abs(share[n] - TRUTH_REMOTE[n]) > 0.1 for n in "ABCD"), share


def test_probe_weight_options_are_checked(tmp_path):
    csv = tmp_path / "r.csv"
    _csv(csv, _reports(0.2))
    p = run_udamon("record", "--input", str(csv), "-q", "--probe", "w=write",
                   "--probe-weight", "x=1", "-o", str(tmp_path / "o.jsonl"))
    assert p.returncode == 2 and "no probe named x" in p.stderr
    p = run_udamon("record", "--input", str(csv), "-q", "--probe", "w=write",
                   "--probe-weight", "w=abc", "-o", str(tmp_path / "o.jsonl"))
    assert p.returncode == 2 and "--probe-weight" in p.stderr
    run_udamon("record", "--input", str(csv), "-q", "--probe", "w=write",
               "--probe-weight", "w=3", "-o", str(tmp_path / "o.jsonl"), check=True)
    header = json.loads(open(tmp_path / "o.jsonl").readline())
    assert header["probes"][0]["weight"] == 3


def test_reports_of_unknown_threads_are_tallied_and_the_record_reads_back(tmp_path):
    """Reports without a thread (tid -1: kernel accesses under wp/rwp) are counted under
    "unknown" and the record reader accepts what the writer wrote."""
    reps = _reports(0.3)
    reps["tid"][::3] = -1
    csv = tmp_path / "r.csv"
    _csv(csv, reps)
    rec = tmp_path / "r.jsonl"
    run_udamon("record", "--input", str(csv), "-q", "--breakdown", "numa", "-o", str(rec),
               check=True)
    from udamon.record.reader import read_record

    r = read_record(str(rec))
    threads = {}
    for s in r.snapshots:
        for k, v in s.numa["threads"].items():
            threads[k] = [a + b for a, b in zip(threads.get(k, [0, 0, 0]), v, strict=True)]
    assert sum(threads["unknown"]) == int((reps["tid"] == -1).sum())
    p = run_udamon("report", "numa", "-i", str(rec), "--format", "json", check=True)
    assert "unknown" in json.loads(p.stdout)["targets"][0]["threads"]


def test_report_numa_says_a_controlled_records_counts_are_page_estimates(tmp_path):
    """wp/rwp weigh each report by its region's pages (docs/record-format.md ``numa``):
    the text must call those counts estimated pages, not exact report counts."""
    csv = tmp_path / "r.csv"
    _csv(csv, _reports(0.3))
    rec = tmp_path / "r.jsonl"
    run_udamon("record", "--input", str(csv), "-q", "--breakdown", "numa", "-o", str(rec),
               check=True)
    p = run_udamon("report", "numa", "-i", str(rec), check=True)
    assert "  reports: local" in p.stdout and "exact counts" in p.stdout
    lines = open(rec).read().splitlines()
    header = json.loads(lines[0])
    header["coverage"] = "controlled"
    ctl = tmp_path / "c.jsonl"
    ctl.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    p = run_udamon("report", "numa", "-i", str(ctl), check=True)
    assert "  pages: local" in p.stdout and "estimated" in p.stdout, p.stdout
    assert "exact counts" not in p.stdout


def test_one_locality_analysis_for_report_exporter_and_migrate():
    """udamon.core.locality: local/remote probes when there are, else node probes by
    page location; the exporter's ratio and migrate's node hits are read from it."""
    import numpy as np

    from udamon.core.locality import node_probe_hits, region_locality, target_locality
    from udamon.core.monitor import Snapshot

    u = np.uint64
    start, end = np.array([0, 4096 * 4], dtype=u), np.array([4096 * 4, 4096 * 12], dtype=u)
    # region 0: 4 pages all on node 0, accessed 6 x from node 0 and 2 x from node 1;
    # region 1: 8 pages, half on each node, accessed 4 x from node 1
    pn = np.array([[4, 0], [4, 4]], dtype=np.int64)
    snap = Snapshot(10, 0, 1, 5000, start, end, np.array([8, 4]), np.array([0, 0]),
                    {"node:0": np.array([6, 0]), "node:1": np.array([2, 4])}, 12, 12,
                    page_nodes=pn)
    nodes, hits = node_probe_hits(snap)
    assert nodes == [0, 1] and hits.tolist() == [[6, 0], [2, 4]]
    local, located = region_locality(snap)
    assert local.tolist() == [6.0, 2.0] and located.tolist() == [8.0, 4.0]
    assert target_locality(snap) == (6 * 16384 + 2 * 32768, 8 * 16384 + 4 * 32768)
    snap.probe_hits.update(local=np.array([5, 1]), remote=np.array([3, 3]))
    local, located = region_locality(snap)  # per-report probes win
    assert local.tolist() == [5.0, 1.0] and located.tolist() == [8.0, 4.0]
    snap.numa = {"local": 7, "remote": 5, "unknown": 0, "threads": {}}
    assert target_locality(snap) == (7.0, 12.0)  # exact counts win for the target
    snap.page_nodes = None
    del snap.probe_hits["local"], snap.probe_hits["remote"]
    assert region_locality(snap) is None  # nothing says where the pages are
