"""Reports beyond ``access``: heatmap, wss, ksm, dirty, sharing, numa.

Text reports are compared with golden files in tests/golden/ (regenerate with
UDAMON_UPDATE_GOLDEN=1); the others are checked against synthetic workloads
whose ground truth the test knows.
"""

import gzip
import json
import os

import numpy as np
import pytest
from conftest import run_udamon

from udamon.primitives.synthetic import DEMO_BUFFERS, Stream, generate, write_csv

MiB = 1 << 20
BASE = 0x7F00_0000_0000
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
PAGE = 4096

# every breakdown probe the demo workload can use (node:1 stands for CPU 1's node, so that
# the record does not depend on this machine's topology)
DEMO_PROBES = ["cpu:0=cpus:0", "cpu:1=cpus:1", "node:0=cpus:0", "node:1=cpus:1",
               "write=write", "read=read", "thread:4242=threads:4242",
               "thread:4243=threads:4243", "thread:4244=threads:4244"]


def report(kind: str, *args: str, cwd=None, check: bool = True):
    """``udamon report KIND ...`` as a user runs it."""
    p = run_udamon("report", kind, *args, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"report {kind} {' '.join(args)} failed ({p.returncode}):\n"
                             f"{p.stderr}")
    return p


def record(csv, out, *extra: str) -> None:
    probes = [x for p in DEMO_PROBES for x in ("--probe", p)]
    run_udamon("record", "--input", str(csv), "-q", "--seed", "3", *probes, *extra,
               "-o", str(out), check=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Directory holding demo.csv and demo.jsonl (the demo workload, 2 s, all probes)."""
    d = tmp_path_factory.mktemp("demo")
    run_udamon("synth", "-o", str(d / "demo.csv"), "--duration", "2s", check=True)
    record(d / "demo.csv", d / "demo.jsonl")
    return d


def check_golden(name: str, text: str) -> None:
    path = os.path.join(GOLDEN, name)
    if os.environ.get("UDAMON_UPDATE_GOLDEN") == "1":
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return
    if not os.path.exists(path):
        pytest.fail(f"no golden file {path}: run with UDAMON_UPDATE_GOLDEN=1")
    with open(path) as f:
        want = f.read()
    assert text == want, f"{name} differs from the golden file (UDAMON_UPDATE_GOLDEN=1 to update)"


@pytest.mark.parametrize("name,args", [
    ("heatmap", ["--color", "never"]),
    ("heatmap_write", ["--probe", "write", "--resol-addr", "40", "--resol-time", "10",
                       "--color", "never"]),
    ("wss", []),
    ("wss_write", ["--probe", "write", "--min-accesses", "10"]),
    ("ksm", ["--min-age", "500ms"]),
    ("dirty", []),
    ("sharing", []),
    ("numa", []),
])
def test_golden_text(demo, name, args):
    kind = name.split("_")[0]
    out = report(kind, "-i", "demo.jsonl", *args, cwd=demo).stdout
    check_golden(f"{name}.txt", out)


def test_heatmap_colour_and_json(demo):
    out = report("heatmap", "-i", "demo.jsonl", "--color", "always", cwd=demo).stdout
    assert "\x1b[48;5;" in out and out.count("\n") > 20
    doc = json.loads(report("heatmap", "-i", "demo.jsonl", "--format", "json", "--probe",
                            "write", "--resol-addr", "112", "--resol-time", "5",
                            cwd=demo).stdout)
    m = np.array([[np.nan if v is None else v for v in row] for row in doc["matrix"]])
    assert m.shape == (5, 112)
    edges = np.array(doc["addr_edges"], dtype=np.float64)
    assert len(edges) == 113 and np.all(np.diff(edges) > 0)
    mid = (edges[:-1] + edges[1:]) / 2

    def cols(buf):
        lo, hi = (BASE + x * MiB for x in DEMO_BUFFERS[buf])
        return (mid > lo + MiB) & (mid < hi - MiB)

    assert np.nanmin(m[:, cols("W")]) >= 18  # written in (nearly) every sampling interval
    assert np.nanmax(m[:, cols("R")]) == 0  # only read
    assert np.nanmax(m[-1, cols("I")]) == 0  # idle after 200 ms
    assert np.nanmin(m[0, cols("I")]) > 0
    # the gaps between the demo's ranges are cut out of the axis
    assert len(doc["segments"]) >= 2


def test_heatmap_png(demo, tmp_path):
    from matplotlib.image import imread

    png = tmp_path / "heat.png"
    p = report("heatmap", "-i", "demo.jsonl", "--format", "png", "--output", str(png),
               cwd=demo)
    assert "wrote" in p.stderr and p.stdout == ""
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = imread(str(png))
    assert img.shape[:2] == (700, 1200)
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50
    png2 = tmp_path / "small.png"
    report("heatmap", "-i", "demo.jsonl", "--format", "png", "-o", str(png2), "--size",
           "640x400", "--probe", "cpu:1", cwd=demo)
    assert imread(str(png2)).shape[:2] == (400, 640)


def test_wss_json_matches_ground_truth(demo):
    doc = json.loads(report("wss", "-i", "demo.jsonl", "--format", "json", "--probe", "write",
                            cwd=demo).stdout)
    (t,) = doc["targets"]
    series = t["series"]
    assert len(series) == 20
    # writes: W (16 MiB) and S (8 MiB) always; I (16 MiB) only in the first 200 ms
    assert all(22 * MiB <= s["wss"] <= 27 * MiB for s in series[3:])
    assert series[0]["wss"] >= 38 * MiB
    pct = t["percentiles"]
    assert pct["0"] <= pct["50"] <= pct["100"] == max(s["wss"] for s in series)


def test_ksm_finds_never_written_memory(demo):
    doc = json.loads(report("ksm", "-i", "demo.jsonl", "--format", "json", cwd=demo).stdout)
    assert doc["writes_from"] == "probe write" and doc["reads_from"] == "probe read"
    (t,) = doc["targets"]
    assert t["min_age_ns"] == 1_000_000_000  # half of the 2 s record

    def covered(buf):
        lo, hi = (BASE + x * MiB for x in DEMO_BUFFERS[buf])
        return sum(max(0, min(c["end"], hi) - max(c["start"], lo)) for c in t["candidates"])

    assert covered("R") == 16 * MiB  # read, never written
    assert covered("I") >= 15 * MiB  # written only in the first 200 ms
    assert covered("W") == 0 and covered("S") == 0
    by_start = sorted(t["candidates"], key=lambda c: c["start"])
    r = next(c for c in by_start if c["start"] <= BASE < c["end"])
    assert r["never_written"] and r["read_bytes"] == r["size"]


def test_ksm_write_only_record_and_errors(demo, tmp_path):
    wo = tmp_path / "wo.jsonl"
    run_udamon("record", "--input", str(demo / "demo.csv"), "-q", "--seed", "1",
               "--write-only", "-o", str(wo), check=True)
    doc = json.loads(report("ksm", "-i", str(wo), "--format", "json").stdout)
    assert doc["writes_from"] == "nr_accesses" and doc["reads_from"] is None
    assert doc["targets"][0]["candidate_bytes"] >= 31 * MiB  # R and I
    text = report("ksm", "-i", str(wo)).stdout
    assert "reads: unknown" in text and "?" in text

    plain = tmp_path / "plain.jsonl"
    run_udamon("record", "--input", str(demo / "demo.csv"), "-q", "-o", str(plain), check=True)
    for kind in ("ksm", "dirty"):
        p = report(kind, "-i", str(plain), check=False)
        assert p.returncode == 2 and p.stdout == ""
        assert "cannot tell writes apart" in p.stderr and len(p.stderr.splitlines()) == 1
    for kind, msg in (("sharing", "no per-CPU or per-thread probes"), ("numa", "node:<n>")):
        p = report(kind, "-i", str(plain), check=False)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.splitlines()) == 1


@pytest.mark.parametrize("args,msg", [
    (["heatmap", "--format", "png"], "needs --output"),
    (["heatmap", "--output", "x.png"], "--output is for --format png"),
    (["heatmap", "--probe", "nope"], "not a probe"),
    (["heatmap", "--resol-addr", "0"], "must be positive"),
    (["heatmap", "--size", "big"], "WIDTHxHEIGHT"),
    (["wss", "--format", "png"], "supports --format text, json"),
    (["wss", "--min-accesses", "0"], "must be positive"),
    (["heatmap", "--pid", "1"], "not a target"),
    (["sharing", "--groups", "0"], "must be positive"),
])
def test_usage_errors(demo, args, msg):
    kind, *rest = args
    p = report(kind, "-i", "demo.jsonl", *rest, cwd=demo, check=False)
    assert p.returncode == 2, p.stderr
    assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _dirty_truth(rate_hz: float, size: int, aggr_s: float) -> float:
    """Expected distinct bytes dirtied per aggregation interval, per second: writes
    land on uniformly random pages."""
    pages = size // PAGE
    return pages * (1 - np.exp(-rate_hz * aggr_s / pages)) * PAGE / aggr_s


def test_dirty_ranks_and_estimates_rates(tmp_path):
    a_base, b_base, c_base = 0x7F10_0000_0000, 0x7F20_0000_0000, 0x7F30_0000_0000
    fast = Stream(1001, 1001, 0, a_base, 8 * MiB, 200_000, 1.0)  # ~80 MiB/s dirtied
    slow = Stream(1002, 1002, 1, b_base, 820 * 1024, 20_000, 1.0)  # ~8 MiB/s: 10x slower
    reader = Stream(1003, 1003, 1, c_base, 4 * MiB, 50_000, 0.0)  # never writes
    csv = tmp_path / "dirty.csv"
    write_csv(generate([fast, slow, reader], 2_000_000_000, seed=5), str(csv))
    rec = tmp_path / "dirty.jsonl"
    run_udamon("record", "--input", str(csv), "-q", "--seed", "2", "--probe", "write=write",
               "-o", str(rec), check=True)
    doc = json.loads(report("dirty", "-i", str(rec), "--format", "json").stdout)
    ranked = [t["pid"] for t in doc["targets"]]
    assert ranked == [1003, 1002, 1001]
    est = {t["pid"]: t for t in doc["targets"]}
    assert est[1003]["mean_bps"] == 0
    for s in (fast, slow):
        truth = _dirty_truth(s.rate_hz, s.size, 0.1)
        got = est[s.pid]["median_bps"]
        assert abs(got - truth) <= 0.15 * truth, (s.pid, got, truth)  # stated tolerance: 15%
        assert est[s.pid]["trend"] == "stable"
    assert 7 < est[1001]["mean_bps"] / est[1002]["mean_bps"] < 13
    text = report("dirty", "-i", str(rec)).stdout
    lines = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(x[1]) for x in lines] == [1003, 1002, 1001]


def test_dirty_trend(tmp_path):
    base = 0x7F10_0000_0000
    # one buffer written all along, a second one joining after 1 s: the rate doubles
    streams = [Stream(7, 7, 0, base, 4 * MiB, 100_000, 1.0),
               Stream(7, 7, 0, base + 4 * MiB, 4 * MiB, 100_000, 1.0, 1_000_000_000)]
    csv = tmp_path / "t.csv"
    write_csv(generate(streams, 2_000_000_000, seed=1), str(csv))
    rec = tmp_path / "t.jsonl"
    run_udamon("record", "--input", str(csv), "-q", "--seed", "1", "--write-only",
               "--range", f"{base:#x}-{base + 8 * MiB:#x}", "-o", str(rec), check=True)
    doc = json.loads(report("dirty", "-i", str(rec), "--format", "json").stdout)
    (t,) = doc["targets"]
    assert doc["writes_from"] == "nr_accesses"
    assert t["trend"] == "rising" and t["slope_bps_per_s"] > 0


def test_sharing_pairs_and_groups(demo):
    doc = json.loads(report("sharing", "-i", "demo.jsonl", "--format", "json",
                            cwd=demo).stdout)
    kinds = {m["kind"]: m for m in doc["matrices"]}
    assert kinds["cpu"]["ids"] == [0, 1] and kinds["thread"]["ids"] == [4242, 4243, 4244]
    top = doc["thread_pairs"][0]
    assert (top["a"], top["b"]) == (4243, 4244)
    assert 7.5 * MiB <= top["shared"] <= 9 * MiB  # S, 8 MiB, written by 4244
    cpu = np.array(kinds["cpu"]["shared"])
    assert 7.5 * MiB <= cpu[0, 1] <= 9 * MiB and cpu[0, 1] == cpu[1, 0]
    written = np.array(kinds["cpu"]["shared_written"])
    assert written[0, 1] == pytest.approx(cpu[0, 1])  # all of S is written
    assert doc["ngroups"] == 2 and [4243, 4244] in doc["groups"]
    three = json.loads(report("sharing", "-i", "demo.jsonl", "--format", "json", "--groups",
                              "3", cwd=demo).stdout)
    assert sorted(three["groups"]) == [[4242], [4243], [4244]]


def _add_page_nodes(src, dst, node_of) -> None:
    """Write a copy of a record with per-region page locations ('nodes' key)."""
    with open(src) as f:
        lines = f.read().splitlines()
    out = [lines[0]]
    for ln in lines[1:]:
        obj = json.loads(ln)
        for r in obj.get("regions", []):
            n = node_of(r["start"])
            r["nodes"] = {str(n): max((r["end"] - r["start"]) // PAGE // 64, 1)}
        out.append(json.dumps(obj))
    with gzip.open(dst, "wt") as f:
        f.write("\n".join(out) + "\n")


def test_numa_local_remote(demo, tmp_path):
    # pages of R on node 1 (but read by CPU 0 = node 0), all else on node 0;
    # W is written by CPU 1 = node 1: remote too; S is used from both nodes.
    rlo, rhi = (BASE + x * MiB for x in DEMO_BUFFERS["R"])
    rec = tmp_path / "pages.jsonl.gz"
    _add_page_nodes(demo / "demo.jsonl", rec, lambda a: 1 if rlo <= a < rhi else 0)
    doc = json.loads(report("numa", "-i", str(rec), "--format", "json").stdout)
    assert doc["page_locations"] and doc["nodes"] == [0, 1]
    (t,) = doc["targets"]
    # hot bytes: R 16 MiB (node 0), W 16 (node 1), S 8 + 8 (both): local = S from node 0
    assert 0.1 < t["local_ratio"] < 0.25
    text = report("numa", "-i", str(rec), "--top", "3").stdout
    assert "hottest remotely accessed regions" in text
    hot = [int(ln.split()[0], 16) for ln in text.splitlines() if ln.startswith("    0x")]
    assert len(hot) == 3
    wlo, whi = (BASE + x * MiB for x in DEMO_BUFFERS["W"])
    slo, shi = (BASE + x * MiB for x in DEMO_BUFFERS["S"])
    assert all(rlo <= a < rhi or wlo <= a < whi or slo <= a < shi for a in hot)
    regions = {r["start"]: r for r in t["regions"]}
    s_reg = [r for a, r in regions.items() if slo <= a and r["end"] <= shi and r["size"] > MiB]
    assert s_reg and all(0.4 < r["remote"] / (r["local"] + r["remote"]) < 0.6 for r in s_reg)
    plain = report("numa", "-i", "demo.jsonl", cwd=demo).stdout
    assert "needs per-region page nodes" in plain or "no local/remote split" in plain


def test_unknown_coverage_is_said(demo, tmp_path):
    with open(demo / "demo.jsonl") as f:
        lines = f.read().splitlines()
    head = json.loads(lines[0])
    head["coverage"] = "unknown"
    rec = tmp_path / "hint.jsonl"
    rec.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    for kind in ("heatmap", "wss", "ksm", "dirty", "sharing", "numa"):
        out = report(kind, "-i", str(rec), "--color", "never") if kind == "heatmap" else \
            report(kind, "-i", str(rec))
        assert "not observed" in out.stdout, kind
    assert "observed hits" in report("heatmap", "-i", str(rec)).stdout
