"""Cache-aware thread placement (``udamon place``) on this host.

The host has one LLC domain, so the real topology must make ``place`` say so and do
nothing.  Everything else runs here against real processes with ``--domains 0/1``
(each CPU its own domain): the llc_pairs workload (tests/workloads/llc_pairs.c: a0+a1
write-share buffer A, b0+b1 read-share B) with its pairs pinned across the two CPUs,
its sharing given as a replayed record whose reports the test writes itself (ground
truth: which thread touched which page from which CPU), and real sched_setaffinity
on its threads: the plan, the masks set, the undo, threads that leave or appear and
one that exits mid-apply.  The live two-LLC run (hint, TCG guest with two sockets)
is tests/test_guest_place.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_udamon

from udamon.core.monitor import Snapshot
from udamon.errors import RuntimeFailure, UsageError
from udamon.probes.filters import parse_conditions
from udamon.probes.probe import Probe
from udamon.record.reader import Record
from udamon.report import placement as place_report
from udamon.schemes import affinity, placement
from udamon.targets import threads as thr
from udamon.targets.topology import (
    format_cpulist,
    given_topology,
    parse_cpulist,
    read_topology,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads.build import BuildError, build  # noqa: E402

TWO = given_topology([[0], [1]], read_topology()) if len(read_topology().cpus) >= 2 else None
needs_two_cpus = pytest.mark.skipif(TWO is None, reason="needs two online CPUs")


# -- topology -----------------------------------------------------------------------


def _sysfs(root: Path, cpus: dict[int, dict[int, tuple[int, str, str]]], online: str,
           nodes: dict[int, str]) -> tuple[str, str]:
    """cpus: cpu -> index -> (level, type, shared_cpu_list)."""
    c = root / "cpu"
    c.mkdir(parents=True)
    (c / "online").write_text(online + "\n")
    for cpu, idx in cpus.items():
        (c / f"cpu{cpu}" / "cache").mkdir(parents=True)
        for i, (level, typ, shared) in idx.items():
            d = c / f"cpu{cpu}" / "cache" / f"index{i}"
            d.mkdir()
            (d / "level").write_text(f"{level}\n")
            (d / "type").write_text(f"{typ}\n")
            (d / "shared_cpu_list").write_text(f"{shared}\n")
    n = root / "node"
    n.mkdir()
    for node, lst in nodes.items():
        (n / f"node{node}").mkdir()
        (n / f"node{node}" / "cpulist").write_text(lst + "\n")
    return str(c), str(n)


def test_llc_domains_from_constructed_sysfs(tmp_path):
    """Two sockets of two SMT threads each: L3 0-1 and 2-3; an instruction cache at a
    higher index and an offline CPU must not matter."""
    def caches(core: str, l3: str):
        return {0: (1, "Data", core), 1: (1, "Instruction", core), 2: (2, "Unified", core),
                3: (3, "Unified", l3), 4: (4, "Instruction", "0-3")}
    cpus = {0: caches("0", "0-1"), 1: caches("1", "0-1"), 2: caches("2", "2-3"),
            3: caches("3", "2-3")}
    cr, nr = _sysfs(tmp_path, cpus, "0-2", {0: "0-1", 1: "2-3"})
    t = read_topology(cr, nr)
    assert t.level == "L3" and t.cpus == (0, 1, 2)
    assert [(d.cpus, d.nodes) for d in t.domains] == [((0, 1), (0,)), ((2,), (1,))]
    assert t.domain_of_cpu() == {0: 0, 1: 0, 2: 1}
    assert t.nodes == {0: (0, 1), 1: (2,)}


def test_topology_fallbacks(tmp_path):
    # no cache information: one domain per node
    cr, nr = _sysfs(tmp_path / "a", {}, "0-3", {0: "0-1", 1: "2-3"})
    t = read_topology(cr, nr)
    assert t.level == "node" and [d.cpus for d in t.domains] == [(0, 1), (2, 3)]
    # neither: the machine
    cr, nr = _sysfs(tmp_path / "b", {}, "0-3", {})
    t = read_topology(cr, nr)
    assert t.level == "machine" and [d.cpus for d in t.domains] == [(0, 1, 2, 3)]


def test_this_machine_agrees_with_lscpu():
    """lscpu's last cache column: CPUs with the same id share that cache."""
    p = subprocess.run(["lscpu", "-p=cpu,cache"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"lscpu failed: {p.stderr.strip()}")
    # "0,0:0:0:0": the CPU, then the cache ids L1d:L1i:L2:L3 (the cache column is ','-
    # separated in some util-linux versions)
    rows = [re.split(r"[,:]", line) for line in p.stdout.splitlines()
            if line and not line.startswith("#")]
    groups: dict[str, list[int]] = {}
    for row in rows:
        groups.setdefault(row[-1], []).append(int(row[0]))
    t = read_topology()
    assert sorted(list(d.cpus) for d in t.domains) == sorted(sorted(g) for g in groups.values())


def test_cpulists_and_given_domains():
    assert format_cpulist([5, 0, 1, 2, 9, 10]) == "0-2,5,9-10"
    assert parse_cpulist(format_cpulist([3, 1, 2, 7])) == [1, 2, 3, 7]
    base = read_topology()
    with pytest.raises(ValueError, match="not online"):
        given_topology([[0], [4096]], base)
    if len(base.cpus) >= 2:
        with pytest.raises(ValueError, match="in two domains"):
            given_topology([[0, 1], [1]], base)


# -- threads ----------------------------------------------------------------------


def test_parse_stat_with_awkward_comm():
    fields = ["S"] + [str(i) for i in range(4, 53)]
    fields[14 - 3], fields[15 - 3], fields[22 - 3], fields[39 - 3] = "70", "30", "12345", "1"
    st = thr.parse_stat(42, "42 (a) b (c) " + " ".join(fields))
    assert (st.comm, st.state, st.cpu_ticks, st.starttime, st.processor) == (
        "a) b (c", "S", 100, 12345, 1)


def test_cpusets_from_constructed_cgroup_files(tmp_path):
    root = tmp_path / "cg"
    (root / "svc" / "worker").mkdir(parents=True)
    (root / "cpuset.cpus.effective").write_text("0-7\n")
    (root / "svc" / "cpuset.cpus.effective").write_text("2-5\n")
    # v2: the nearest cgroup with the file (worker has none of its own)
    assert thr._cpus_file(str(root), "/", "/svc/worker", "cpuset.cpus.effective", True) == [
        2, 3, 4, 5]
    # a mount whose root is the cgroup itself (a container's view)
    assert thr._cpus_file(str(root / "svc"), "/svc", "/svc", "cpuset.cpus.effective",
                          True) == [2, 3, 4, 5]
    mi = tmp_path / "mountinfo"
    mi.write_text("31 23 0:28 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n"
                  "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    assert thr._mounts(str(mi)) == [("cgroup", "/sys/fs/cgroup/cpuset", "/", "rw,cpuset"),
                                    ("cgroup2", "/sys/fs/cgroup/unified", "/", "rw")]


def test_own_threads_mask_and_cpuset():
    me = os.getpid()
    ts = thr.list_threads(me)
    assert me in ts and ts[me].comm == Path(f"/proc/{me}/comm").read_text().strip()
    assert thr.get_mask(me) == frozenset(os.sched_getaffinity(0))
    cs = thr.cpuset_cpus(me, me)
    if cs is not None:  # the kernel keeps every mask inside the cpuset
        assert thr.get_mask(me) <= frozenset(cs)


# -- the planner on constructed sharing --------------------------------------------


def info(tid, mask, use=1.0, allowed=None, cpuset=None, seen=None):
    mask = frozenset(mask)
    allowed = frozenset(allowed if allowed is not None else mask)
    if cpuset is not None:
        allowed &= frozenset(cpuset)
    return placement.ThreadInfo(tid, f"t{tid}", 1000 + tid, mask,
                                None if cpuset is None else frozenset(cpuset), allowed,
                                use, min(1.0, 2 * use), seen or {})


def sharing(tids, shared: dict[tuple[int, int], tuple[float, float]], own=1 << 20):
    """shared: (tid a, tid b) -> (read-only bytes, written bytes)."""
    k = len(tids)
    tot, wr = np.zeros((k, k)), np.zeros((k, k))
    np.fill_diagonal(tot, own)
    for (a, b), (r, w) in shared.items():
        i, j = tids.index(a), tids.index(b)
        tot[i, j] = tot[j, i] = r + w
        wr[i, j] = wr[j, i] = w
    return placement.Sharing(list(tids), tot, wr, 10)


def domains_of(p):
    return {t: e.domain for t, e in p.entries.items() if e.domain is not None}


@needs_two_cpus
def test_pairs_split_across_domains_are_brought_together():
    th = [info(1, {0}, allowed={0, 1}), info(2, {1}, allowed={0, 1}),
          info(3, {0}, allowed={0, 1}), info(4, {1}, allowed={0, 1})]
    sh = sharing([1, 2, 3, 4], {(1, 2): (0, 800e3), (3, 4): (500e3, 0)})
    p = placement.plan(TWO, th, sh)
    d = domains_of(p)
    assert d[1] == d[2] and d[3] == d[4] and d[1] != d[3]
    assert p.predicted_before == pytest.approx(1.0) and p.predicted_after == pytest.approx(0.0)
    for t in th:  # the new masks are the domain's CPUs; a thread already there stays
        e = p.entries[t.tid]
        assert (e.new_mask or t.mask) == frozenset(TWO.domains[e.domain].cpus)
    assert sum(1 for e in p.entries.values() if e.action == "move") == 2


@needs_two_cpus
def test_pinned_thread_is_an_anchor_and_cpusets_are_honoured():
    # thread 2 may only run on CPU 1 (its own mask): 1 must come to it
    th = [info(1, {0, 1}, 0.4, seen={0: 5}), info(2, {1}, 0.4)]
    p = placement.plan(TWO, th, sharing([1, 2], {(1, 2): (0, 1e6)}))
    assert p.entries[2].action == "fixed" and p.entries[2].new_mask is None
    assert p.entries[1].new_mask == frozenset({1})
    # ... unless both are busy: two CPUs' worth of CPU use does not go onto one CPU
    th = [info(1, {0, 1}, 1.0, seen={0: 5}), info(2, {1}, 1.0)]
    p = placement.plan(TWO, th, sharing([1, 2], {(1, 2): (0, 1e6)}))
    assert not p.changes and "no partner fits" in p.entries[1].why
    # a cpuset that holds only CPU 0: the group goes to domain 0 whatever the masks
    th = [info(1, {0, 1}, 0.4, cpuset={0}, seen={0: 1}), info(2, {0, 1}, 0.4, seen={1: 5})]
    p = placement.plan(TWO, th, sharing([1, 2], {(1, 2): (0, 1e6)}))
    assert domains_of(p) == {1: 0, 2: 0} and p.entries[2].new_mask == frozenset({0})
    assert p.entries[1].action == "fixed"  # its cpuset leaves it one domain


@needs_two_cpus
def test_capacity_write_weight_and_noise():
    # three threads of half a CPU each, one CPU per domain: two fit together (1.0 of
    # 1.1 CPUs), three do not; 1 shares a lot read-only with 2, less but written with 3:
    # writes weigh 4x
    th = [info(1, {0, 1}, 0.5), info(2, {0, 1}, 0.5), info(3, {0, 1}, 0.5)]
    sh = sharing([1, 2, 3], {(1, 2): (600e3, 0), (1, 3): (0, 300e3)})
    d = domains_of(placement.plan(TWO, th, sh))
    assert d[1] == d[3] and 2 not in d  # 2 is left alone: no partner fits with it
    d = domains_of(placement.plan(TWO, th, sh, write_weight=1.0))
    assert d[1] == d[2] and 3 not in d
    # four light threads fit in one domain; a 1% straddle between the pairs is noise
    th = [info(t, {0, 1}, use=0.1) for t in (1, 2, 3, 4)]
    shared = {(1, 2): (0, 800e3), (3, 4): (0, 800e3), (2, 3): (10e3, 0)}
    d = domains_of(placement.plan(TWO, th, sharing([1, 2, 3, 4], shared)))
    assert d[1] == d[2] and d[3] == d[4] and d[1] != d[3]
    d = domains_of(placement.plan(TWO, th, sharing([1, 2, 3, 4], shared), min_join=0.0))
    assert len(set(d.values())) == 1  # without the threshold the noise joins them


def test_nothing_moves_without_sharing_or_monitoring():
    th = [info(1, {0}), info(2, {0}), info(9, {0})]
    p = placement.plan(TWO or read_topology(), th, sharing([1, 2], {}))
    assert not p.changes and p.predicted_before is None
    assert p.entries[9].action == "alone" and "not monitored" in p.entries[9].why


# -- measuring cross-domain sharing in a record -------------------------------------


def _record(snaps: list[Snapshot], names: list[str]) -> Record:
    from udamon.core.attrs import Attrs

    kind = {"thread": "threads", "cpu": "cpus"}
    probes = [Probe(n, tuple(parse_conditions(f"{kind[n.split(':')[0]]}:{n.split(':')[1]}")))
              for n in names]
    return Record("constructed", {"targets": [{"pid": 1}], "coverage": "unknown"}, Attrs(),
                  [], probes, snaps, {"reason": "duration"})


def _snap(regions, names):
    """regions: [(start, end, {probe: hits})]"""
    return Snapshot(time_ns=2_000_000_000, start_ns=1_000_000_000, pid=1, sample_us=5000,
                    start=np.asarray([r[0] for r in regions], dtype=np.uint64),
                    end=np.asarray([r[1] for r in regions], dtype=np.uint64),
                    nr_accesses=np.ones(len(regions), dtype=np.int64),
                    age=np.zeros(len(regions), dtype=np.int64),
                    probe_hits={n: np.asarray([r[2].get(n, 0) for r in regions],
                                              dtype=np.int64) for n in names})


@needs_two_cpus
def test_measured_cross_domain_share():
    names = ["thread:1", "thread:2", "cpu:0", "cpu:1"]
    s = _snap([(0x1000, 0x3000, {"thread:1": 3, "thread:2": 1, "cpu:0": 3, "cpu:1": 1}),
               # one thread from both CPUs: not sharing, not counted
               (0x3000, 0x4000, {"thread:1": 2, "cpu:0": 1, "cpu:1": 1}),
               # shared within one domain: sharing, not cross
               (0x4000, 0x6000, {"thread:1": 1, "thread:2": 1, "cpu:1": 4})], names)
    m = place_report.measured_cross(_record([s], names), 1, TWO)
    # region 1: 8 KiB x 4 hits, 1 of them from outside; region 3: 8 KiB x 4 hits, none
    assert m.share == pytest.approx(1 / 8) and m.snapshots == 1
    empty = place_report.measured_cross(_record([], names), 1, TWO)
    assert empty.share is None and "no region" in empty.why


# -- against the real workload: apply, undo, threads that come and go ---------------


@pytest.fixture(scope="module")
def llc_pairs_bin():
    try:
        return build("llc_pairs")
    except BuildError as e:
        pytest.skip(f"cannot build the workload: {e}")


class Workload:
    def __init__(self, binary, *args):
        self.p = subprocess.Popen([binary, "--size", "0.25", "--duration", "300",
                                   "--pause-us", "200", *args], stdout=subprocess.PIPE,
                                  text=True)
        self.info = json.loads(self.p.stdout.readline())
        self.pid = self.info["pid"]
        self.tids = self.info["tids"]

    def pin(self, layout: dict[str, int]) -> None:
        for name, cpu in layout.items():
            os.sched_setaffinity(self.tids[name], {cpu})

    def masks(self) -> dict[str, frozenset[int]]:
        """The masks of the named threads still alive."""
        return {k: frozenset(os.sched_getaffinity(t)) for k, t in self.tids.items()
                if thr.read_stat(self.pid, t) is not None}

    def event(self, sig) -> dict:
        self.p.send_signal(sig)
        return json.loads(self.p.stdout.readline())

    def stop(self) -> dict:
        self.p.send_signal(signal.SIGTERM)
        out, _ = self.p.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def workload(llc_pairs_bin):
    w = Workload(llc_pairs_bin)
    yield w
    if w.p.poll() is None:
        end = w.stop()
        assert w.p.returncode == 0 and end["intact"], end


BAD = {"a0": 0, "a1": 1, "b0": 0, "b1": 1}  # each pair split across the two CPUs


def replay_record(tmp_path, w: Workload, seconds: float = 1.0) -> Path:
    """A record of what the workload does, from reports the test writes: in every 5 ms
    sampling interval each worker touches every page of its buffer from the CPU it is
    pinned to (a0, a1 write A; b0, b1 read B).  So every region of A and B is shared
    by its pair from both CPUs in every interval: cross-domain share 50 % exactly."""
    page = w.info["page_size"]
    rows = ["time_ns,pid,tid,cpu,addr,size,write"]
    pages = {b: range(w.info[b][0], w.info[b][1], page) for b in "AB"}
    for k in range(int(seconds / 0.005)):
        t0 = 1_000_000_000 + k * 5_000_000
        for j, (name, buf, write) in enumerate((("a0", "A", 1), ("a1", "A", 1),
                                                ("b0", "B", 0), ("b1", "B", 0))):
            for n, addr in enumerate(pages[buf]):
                rows.append(f"{t0 + 1000 * j + n},{w.pid},{w.tids[name]},{BAD[name]},"
                            f"{addr},8,{write}")
    csv = tmp_path / "reports.csv"
    csv.write_text("\n".join(rows) + "\n")
    rec = tmp_path / "window.jsonl"
    rng = [f"--range={w.info[b][0]:#x}-{w.info[b][1]:#x}" for b in "AB"]
    p = run_udamon("record", "--input", str(csv), *rng, "--breakdown", "thread,cpu,rw",
                   "--regions", "4,16", "-q", "-o", str(rec))
    assert p.returncode == 0, p.stderr
    return rec


def place(*args, cwd=None, timeout=120):
    return run_udamon("place", *args, cwd=cwd, timeout=timeout)


def test_one_llc_domain_here_means_nothing_to_do(workload, tmp_path):
    """The host's real topology: one LLC.  The plan says so and changes nothing, also
    with --apply (and writes no undo record)."""
    if len(read_topology().domains) != 1:
        pytest.skip("this machine has more than one LLC domain")
    workload.pin(BAD)
    before = workload.masks()
    p = place("--pid", str(workload.pid), "--apply", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "one L3 domain" in p.stdout and "nothing to do" in p.stdout, p.stdout
    assert workload.masks() == before and not list(tmp_path.iterdir())
    doc = json.loads(place("--pid", str(workload.pid), "--format", "json").stdout)
    assert doc["plan"] is None and len(doc["topology"]["domains"]) == 1
    t = place("--show-topology", "--format", "json")
    assert json.loads(t.stdout) == read_topology().to_dict()


@needs_two_cpus
def test_plan_apply_undo_from_a_record(workload, tmp_path):
    workload.pin(BAD)
    rec = replay_record(tmp_path, workload)
    original = workload.masks()
    plan_path = tmp_path / "plan.json"
    p = place("-i", str(rec), "--pid", str(workload.pid), "--domains", "0/1",
              "--cpus-allowed", "0-1", "--save-plan", str(plan_path), "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert json.loads(plan_path.read_text()) == doc
    t = workload.tids
    groups = sorted(sorted(g["tids"]) for g in doc["groups"])
    assert groups == sorted([sorted([t["a0"], t["a1"]]), sorted([t["b0"], t["b1"]])]), doc
    assert len({g["domain"] for g in doc["groups"]}) == 2
    # A is written, B only read: the weights say so
    pairs = {(q["a"], q["b"]): q for q in doc["pairs"]}
    pa, pb = pairs[(t["a0"], t["a1"])], pairs[(t["b0"], t["b1"])]
    assert pa["written"] > 0 and pa["weight"] == pytest.approx(4 * pa["written"] +
                                                               pa["read_only"], rel=1e-3)
    assert pb["written"] == 0 and pb["read_only"] > 0
    assert (t["a0"], t["b0"]) not in pairs and (t["a0"], t["b1"]) not in pairs
    assert doc["predicted"]["cross_share_before"] == pytest.approx(1.0)
    assert doc["predicted"]["cross_share_after"] == pytest.approx(0.0)
    assert doc["measured_before"]["share"] == pytest.approx(0.5, abs=0.02)
    assert workload.masks() == original  # a plan changes nothing

    # dry run: says what would be set, sets nothing, writes no undo record
    p = place("--plan", str(plan_path), "--dry-run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "dry run: would set 2 mask(s)" in p.stdout and workload.masks() == original
    assert not list(tmp_path.glob("*.undo.json"))

    undo = tmp_path / "undo.json"
    p = place("--plan", str(plan_path), "--apply", "--no-check", "--undo-record", str(undo),
              "--format", "json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["apply"]
    assert sorted(o["status"] for o in res["threads"]) == ["set", "set"]
    now = workload.masks()
    name_of = {v: k for k, v in t.items()}
    for th in doc["threads"]:  # every thread has the mask the plan gave it (or its own)
        if th["tid"] in name_of:
            want = frozenset(parse_cpulist(th["new_mask"] or th["mask"]))
            assert now[name_of[th["tid"]]] == want, th
    assert now["a0"] == now["a1"] and now["b0"] == now["b1"] and now["a0"] != now["b0"]
    u = json.loads(undo.read_text())
    assert u["complete"] and {x["status"] for x in u["threads"]} == {"set"}

    # the same plan again: the masks are not the ones it was made from any more
    again = place("--plan", str(plan_path), "--apply", "--no-check", "--undo-record", str(undo))
    assert again.returncode == 0 and again.stdout.count("changed since the plan") == 2
    assert json.loads(undo.read_text()) == u and workload.masks() == now

    p = place("--undo", str(undo), "--dry-run")
    assert p.returncode == 0 and "would restore 2" in p.stdout and workload.masks() == now
    p = place("--undo", str(undo))
    assert p.returncode == 0, p.stderr
    assert "restored 2 mask(s)" in p.stdout
    assert workload.masks() == original  # exactly the masks before the apply
    p = place("--undo", str(undo))  # twice: nothing left to do
    assert p.returncode == 0 and "unchanged" in p.stdout and workload.masks() == original
    # an apply never replaces an undo record (it may hold masks still to restore)
    again = place("--plan", str(plan_path), "--apply", "--no-check", "--undo-record", str(undo))
    assert again.returncode == 2 and "exists already" in again.stderr
    assert json.loads(undo.read_text()) == u and workload.masks() == original


@needs_two_cpus
def test_threads_that_leave_appear_or_change_are_not_touched(workload, tmp_path):
    workload.pin(BAD)
    rec = replay_record(tmp_path, workload)
    plan_path = tmp_path / "plan.json"
    p = place("-i", str(rec), "--pid", str(workload.pid), "--domains", "0/1",
              "--cpus-allowed", "0-1", "--save-plan", str(plan_path), "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    moving = [th["tid"] for th in doc["threads"] if th["new_mask"]]
    assert len(moving) == 2
    idle = workload.event(signal.SIGUSR1)["tid"]  # a thread the plan knew leaves
    late = workload.event(signal.SIGUSR2)["tid"]  # one it did not know appears
    # someone else changes one of the threads to be moved
    changed = moving[0]
    os.sched_setaffinity(changed, {0, 1})
    undo = tmp_path / "undo.json"
    p = place("--plan", str(plan_path), "--apply", "--no-check", "--undo-record", str(undo))
    assert p.returncode == 0, p.stderr
    assert re.search(rf"{late} late: appeared since the plan: not touched", p.stdout), p.stdout
    assert re.search(rf"{idle} idle: left: ", p.stdout), p.stdout
    assert re.search(rf"{changed} \S+: changed: its mask changed since the plan", p.stdout)
    assert os.sched_getaffinity(changed) == {0, 1}
    assert os.sched_getaffinity(late) == {0, 1}  # untouched: the kernel's default mask
    other = moving[1]
    u = json.loads(undo.read_text())
    assert [x["tid"] for x in u["threads"]] == [other]
    # the other thread was moved; undo puts it back exactly
    assert place("--undo", str(undo)).returncode == 0
    assert os.sched_getaffinity(other) == {BAD[k] for k, v in workload.tids.items()
                                           if v == other}


@needs_two_cpus
def test_a_thread_that_exits_mid_apply_is_reported(workload, tmp_path):
    """The library path of --apply with a thread that really exits between the first
    mask set and its own: it is reported, the others are set, undo restores them."""
    workload.pin({**BAD})
    os.sched_setaffinity(workload.tids["idle"], {0})
    t = workload.tids
    now = {k: frozenset(os.sched_getaffinity(v)) for k, v in t.items()}
    starts = {k: thr.read_stat(workload.pid, v).starttime for k, v in t.items()}
    order = ["a1", "idle", "b0"]  # idle is set second; it exits when a1's turn comes
    planned = [affinity.Planned(t[k], starts[k], k, now[k], frozenset({1 - BAD.get(k, 0)}))
               for k in order]
    known = {v: (starts[k], k) for k, v in t.items()}

    def before_set(p: affinity.Planned) -> None:
        if p.tid == t["a1"]:
            workload.event(signal.SIGUSR1)  # idle exits now, after the plan was checked
            deadline = time.monotonic() + 10
            while thr.read_stat(workload.pid, t["idle"]) is not None:
                assert time.monotonic() < deadline
                time.sleep(0.01)

    undo = tmp_path / "undo.json"
    res = affinity.apply(workload.pid, thr.read_stat(workload.pid, workload.pid).starttime,
                         planned, known, undo_path=str(undo), dry_run=False,
                         before_set=before_set)
    st = {o.tid: o.status for o in res.outcomes}
    assert st == {t["a1"]: "set", t["idle"]: "exited", t["b0"]: "set"}, res.to_dict()
    assert os.sched_getaffinity(t["a1"]) == {0} and os.sched_getaffinity(t["b0"]) == {1}
    u = affinity.read_undo(str(undo))
    assert {x["tid"]: x["status"] for x in u["threads"]} == {
        t["a1"]: "set", t["idle"]: "left", t["b0"]: "set"}
    back = affinity.undo(str(undo))
    assert {o.tid: o.status for o in back.outcomes} == {
        t["a1"]: "restored", t["idle"]: "not-applied", t["b0"]: "restored"}
    assert os.sched_getaffinity(t["a1"]) == {1} and os.sched_getaffinity(t["b0"]) == {0}


def test_apply_refuses_another_process(workload, tmp_path):
    st = thr.read_stat(workload.pid, workload.pid).starttime
    with pytest.raises(RuntimeFailure, match="not the process the plan was made for"):
        affinity.apply(workload.pid, st + 1, [], {}, undo_path=str(tmp_path / "u"),
                       dry_run=False)
    with pytest.raises(UsageError, match="exists already"):
        (tmp_path / "u").write_text("{}")
        t = workload.tids["a0"]
        cur = frozenset(os.sched_getaffinity(t))
        affinity.apply(workload.pid, st,
                       [affinity.Planned(t, thr.read_stat(workload.pid, t).starttime, "a0",
                                         cur, frozenset({0}) if cur != {0} else frozenset({1}))],
                       {}, undo_path=str(tmp_path / "u"), dry_run=False)
    assert os.sched_getaffinity(workload.tids["a0"]) == cur  # nothing set without a record


@needs_two_cpus
@pytest.mark.skipif(os.geteuid() != 0, reason="the check window's live primitive needs root")
def test_apply_runs_the_check_window(workload, tmp_path):
    """--apply from a record runs a live check window with the hint primitive and prints
    before/after side by side (on this one-node host hint sees little; the numbers are
    checked in the guest: tests/test_guest_place.py)."""
    workload.pin(BAD)
    rec = replay_record(tmp_path, workload)
    undo = tmp_path / "undo.json"
    a = workload.info["A"]
    p = place("-i", str(rec), "--pid", str(workload.pid), "--domains", "0/1",
              "--cpus-allowed", "0-1", "--apply", "--undo-record", str(undo),
              "--check-duration", "2s", f"--range={a[0]:#x}-{a[1]:#x}", timeout=180)
    assert p.returncode == 0, p.stderr
    assert "cross-domain share of sharing" in p.stdout and "before" in p.stdout
    assert re.search(r"measured \(accesses to shared regions\)\s+50\.0%", p.stdout), p.stdout
    assert place("--undo", str(undo)).returncode == 0
    assert {k: v for k, v in workload.masks().items() if k in BAD} == {
        k: frozenset({c}) for k, c in BAD.items()}


@pytest.mark.parametrize("args,msg", [
    (["--undo", "/nonexistent.json"], "no such file"),
    (["--plan", "/nonexistent.json"], "no such file"),
    (["--pid", "1", "--domains", "0/0"], "in two domains"),
    (["--pid", "1", "--domains", "x"], "bad --domains"),
    (["--pid", "1", "--write-weight", "0"], "--write-weight"),
    (["--pid", "1,2"], "give one process"),
    (["--pid", str(2**31 - 2)], "does not exist"),
    (["--", "true"], "does not launch commands"),
    (["--force"], "--force is for --undo"),
    ([], "give the process"),
])
def test_bad_usage_is_one_line(args, msg, tmp_path):
    p = place(*args)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_bad_files_are_one_line(tmp_path, workload):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "udamon-place-undo", "version": 1, "pid": "x"}')
    p = place("--undo", str(bad))
    assert p.returncode == 2 and "malformed undo record" in p.stderr
    bad.write_text("not json")
    assert "not JSON" in place("--undo", str(bad)).stderr
    assert "not JSON" in place("--plan", str(bad)).stderr
    bad.write_text('{"format": "udamon-record"}')
    assert "not a plan saved" in place("--plan", str(bad)).stderr
    assert "not an undo record" in place("--undo", str(bad)).stderr
    # a record without thread probes cannot give a plan
    csv = tmp_path / "r.csv"
    csv.write_text("time_ns,pid,tid,cpu,addr,size,write\n"
                   f"1000,{workload.pid},{workload.pid},0,4096,8,1\n")
    rec = tmp_path / "r.jsonl"
    assert run_udamon("record", "--input", str(csv), "-q", "-o", str(rec)).returncode == 0
    p = place("-i", str(rec), "--domains", "0/1" if TWO else "llc")
    if TWO is not None:
        assert p.returncode == 2 and "no per-thread probes" in p.stderr, p.stderr
    # an undo record of a process that is gone
    u = {"format": "udamon-place-undo", "version": 1, "pid": 2**31 - 2, "pid_starttime": 1,
         "threads": []}
    bad.write_text(json.dumps(u))
    p = place("--undo", str(bad))
    assert p.returncode == 1 and "has exited" in p.stderr


def test_undo_record_of_a_killed_apply_still_restores(workload, tmp_path):
    """udamon SIGKILLed after setting a mask, before rewriting the undo record: the
    record says 'pending'; --undo looks at the mask the thread has and restores it."""
    if TWO is None:
        pytest.skip("needs two online CPUs")
    t = workload.tids["a0"]
    before = frozenset(os.sched_getaffinity(t))  # {0, 1}: the workload does not pin
    os.sched_setaffinity(t, {0})  # what the killed apply had done

    def record(applied: list[int]) -> Path:
        path = tmp_path / f"undo-{applied[0]}.json"
        path.write_text(json.dumps({
            "format": "udamon-place-undo", "version": 1, "pid": workload.pid,
            "pid_starttime": thr.read_stat(workload.pid, workload.pid).starttime,
            "complete": False, "threads": [{
                "tid": t, "starttime": thr.read_stat(workload.pid, t).starttime,
                "comm": "a0", "previous": sorted(before), "applied": applied,
                "status": "pending"}]}))
        return path

    p = place("--undo", str(record([0])))
    assert p.returncode == 0 and "restored 1 mask(s)" in p.stdout, p.stdout + p.stderr
    assert frozenset(os.sched_getaffinity(t)) == before
    # a mask that someone else changed since the apply is left alone, unless --force
    os.sched_setaffinity(t, {0})
    p = place("--undo", str(record([1])))
    assert p.returncode == 0 and "changed since the apply" in p.stdout, p.stdout
    assert os.sched_getaffinity(t) == {0}
    p = place("--undo", str(record([1])), "--force")
    assert "restored 1" in p.stdout and frozenset(os.sched_getaffinity(t)) == before


def _cpuset_cgroup(tmp_name: str, cpus: str):
    """A real cpuset cgroup holding ``cpus``: (directory, the file that takes tids or
    None, the file that takes a whole process); None when this machine cannot make one."""
    if os.geteuid() != 0:
        return None
    v1 = Path("/sys/fs/cgroup/cpuset")
    if (v1 / "cpuset.cpus").is_file():
        d = v1 / tmp_name
        try:
            d.mkdir()
            (d / "cpuset.cpus").write_text(cpus)
            (d / "cpuset.mems").write_text((v1 / "cpuset.mems").read_text().strip())
        except OSError:
            return None
        return d, d / "tasks", d / "cgroup.procs", v1 / "tasks"
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").is_file() and "cpuset" in (
            v2 / "cgroup.controllers").read_text().split():
        d = v2 / tmp_name
        try:
            if "cpuset" not in (v2 / "cgroup.subtree_control").read_text().split():
                (v2 / "cgroup.subtree_control").write_text("+cpuset")
            d.mkdir()
            (d / "cpuset.cpus").write_text(cpus)
        except OSError:
            return None
        return d, None, d / "cgroup.procs", v2 / "cgroup.procs"
    return None


@needs_two_cpus
def test_cgroup_cpusets_bound_the_plan(workload, tmp_path):
    """A real cpuset cgroup that holds only CPU 1: whatever --cpus-allowed says, the plan
    never puts its threads on CPU 0.  With per-thread cpusets (cgroup v1) one thread of a
    pair in it is fixed to CPU 1's domain and its partner comes to it."""
    workload.pin(BAD)
    rec = replay_record(tmp_path, workload)
    cg = _cpuset_cgroup(f"udamon-test-{os.getpid()}", "1")
    if cg is None:
        pytest.skip("cannot make a cpuset cgroup here (needs root and a cpuset controller)")
    d, tasks, procs, home = cg
    t = workload.tids
    try:
        if tasks is not None:  # v1: b0 alone into the cpuset
            tasks.write_text(str(t["b0"]))
            assert os.sched_getaffinity(t["b0"]) == {1}  # the kernel moved it
            p = place("-i", str(rec), "--pid", str(workload.pid), "--domains", "0/1",
                      "--cpus-allowed", "0-1", "--format", "json")
            assert p.returncode == 0, p.stderr
            doc = json.loads(p.stdout)
            th = {x["tid"]: x for x in doc["threads"]}
            assert th[t["b0"]]["cpuset"] == "1" and th[t["b0"]]["allowed"] == "1"
            assert th[t["b0"]]["action"] == "fixed" and th[t["b0"]]["domain"] == "dom1"
            assert th[t["b1"]]["domain"] == "dom1" and th[t["b1"]]["new_mask"] is None
            assert th[t["a0"]]["domain"] == th[t["a1"]]["domain"] == "dom0"
            assert th[t["a1"]]["new_mask"] == "0"
        procs.write_text(str(workload.pid))  # now the whole process (v1 and v2)
        p = place("-i", str(rec), "--pid", str(workload.pid), "--domains", "0/1",
                  "--cpus-allowed", "0-1", "--format", "json")
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        named = [x for x in doc["threads"] if x["tid"] in t.values()]
        assert named and all(x["cpuset"] == "1" and x["allowed"] == "1" for x in named)
        assert all(x["new_mask"] in (None, "1") for x in doc["threads"]), doc["threads"]
    finally:
        for tid in os.listdir(f"/proc/{workload.pid}/task"):
            try:
                home.write_text(tid)
            except OSError:
                pass
        if tasks is None:
            try:
                home.write_text(str(workload.pid))
            except OSError:
                pass
        d.rmdir()
