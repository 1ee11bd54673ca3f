"""Reports beyond ``access``: heatmap, wss, ksm, dirty, sharing, numa.

Text reports are compared with golden files in tests/golden/ (regenerate with
UDAMON_UPDATE_GOLDEN=1); the others are checked against synthetic workloads
whose ground truth the test knows.
"""

import gzip
import json
import os
import re

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
    assert "reads from: unknown" in text and "  unknown" in text

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
    (["wss", "--format", "png"], "invalid choice"),
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


def test_dirty_rate_of_a_sparse_writer_counts_distinct_pages(tmp_path):
    """2000 writes/s to random pages of 64 MiB dirty ~2000 distinct pages/s (7.8 MiB/s).
    Weighting a region's size by the sampling intervals with a write would call it
    ~10x that: one write anywhere in a big region would count all of it."""
    base = 0x7F10_0000_0000
    s = Stream(77, 77, 0, base, 64 * MiB, 2000, 1.0)
    csv = tmp_path / "slow.csv"
    reports = generate([s], 4_000_000_000, seed=3)
    write_csv(reports, str(csv))
    rec = tmp_path / "slow.jsonl"
    run_udamon("record", "--input", str(csv), "-q", "--seed", "1", "--write-only",
               "--aggr", "1s", "-o", str(rec), check=True)
    doc = json.loads(report("dirty", "-i", str(rec), "--format", "json").stdout)
    (t,) = doc["targets"]
    assert doc["method"] == "distinct written pages"
    # ground truth from the reports themselves: distinct pages per 1 s interval
    t0 = int(reports["time_ns"].min())
    win = (reports["time_ns"] - t0) // 1_000_000_000
    truth = np.median([len(np.unique(reports["addr"][win == k] // PAGE)) * PAGE
                       for k in range(4)])
    assert abs(t["median_bps"] - truth) <= 0.02 * truth, (t["median_bps"], truth)
    assert t["trend"] == "stable"


# -- audit fixes: units, heatmap layout, wp records, slices, formats, empty records ------


def test_sizes_and_durations_never_use_scientific_notation():
    from udamon.report.common import fmt_rate
    from udamon.units import fmt_duration_ns, fmt_num, fmt_size

    KiB, GiB = 1 << 10, 1 << 30
    assert fmt_size(1010 * MiB) == "1010 MiB" and fmt_size(1000 * MiB) == "1000 MiB"
    assert fmt_size(1020 * KiB) == "1020 KiB"
    assert fmt_size(1023.7 * KiB) == "1 MiB"  # rounds up to the next unit, not "1024 KiB"
    assert fmt_size(1023.6) == "1 KiB" and fmt_size(1023) == "1023 B"
    assert fmt_size(42600 * GiB) == "41.6 TiB" and fmt_size(3 << 50) == "3 PiB"
    assert fmt_size(2.25 * MiB) == "2.25 MiB" and fmt_size(40 * MiB) == "40 MiB"
    assert fmt_rate(1010 * MiB) == "1010 MiB/s"
    assert fmt_duration_ns(999.6e6) == "1 s" and fmt_duration_ns(59.99e9) == "1 m"
    assert fmt_num(1234.0) == "1234" and fmt_num(0.000123) == "0.000123"
    for v in np.geomspace(1, 1e19, 400):
        for text in (fmt_size(v), fmt_duration_ns(v), fmt_num(v)):
            assert "e+" not in text and "e-" not in text, text
        assert float(fmt_size(v).split()[0]) < 1024 or fmt_size(v).endswith("PiB")


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    """A record shaped like a live process: heap, mmap area and stack, terabytes apart."""
    d = tmp_path_factory.mktemp("gappy")
    streams = [Stream(9, 9, 0, 0x55CB_9DAD_8000, 64 * MiB, 20_000, 0.5),
               Stream(9, 9, 0, 0x7F66_FC00_0000, 16 * MiB, 20_000, 0.5),
               Stream(9, 9, 1, 0x7FFE_3A50_2000, 33 * PAGE, 2_000, 0.5)]
    write_csv(generate(streams, 1_000_000_000, seed=2), str(d / "g.csv"))
    run_udamon("record", "--input", str(d / "g.csv"), "-q", "--seed", "1",
               "--breakdown", "rw", "-o", str(d / "g.jsonl"), check=True)
    return d / "g.jsonl"


def test_heatmap_text_address_labels_never_run_together(demo, gappy):
    for rec in (gappy, demo / "demo.jsonl"):
        for cols in range(20, 101, 5):
            out = report("heatmap", "-i", str(rec), "--resol-addr", str(cols), "--color",
                         "never").stdout.splitlines()
            axis = next(i for i, ln in enumerate(out) if ln.lstrip().startswith("+"))
            ticks = [i for i, ch in enumerate(out[axis]) if ch == "|"]
            labels = [ln for ln in out[axis + 1:] if ln.lstrip().startswith("0x")]
            assert labels, out[axis:]
            for ln in labels:
                for m in re.finditer(r"\S+", ln):
                    assert re.fullmatch(r"0x[0-9a-f]{1,12}", m.group()), (cols, ln)
            starts = {m.start() for ln in labels for m in re.finditer(r"0x", ln)}
            assert set(ticks) <= starts, (cols, out[axis], labels)  # a drawn tick has a label


def _png_layout(rec_path, width, height, tmp_path):
    """Draw a heatmap PNG in this process and return its figure's text boxes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from udamon.record.reader import read_record
    from udamon.report import heatmap

    rec = read_record(str(rec_path))
    h = heatmap.build(rec, None, None, 600, 300)
    saved = {}
    orig = Figure.savefig

    def grab(fig, *a, **kw):
        orig(fig, *a, **kw)
        r = fig.canvas.get_renderer()
        ax, cax = fig.axes[0], fig.axes[1]
        saved["fig"] = fig.bbox
        saved["ax"] = ax.get_window_extent(r)
        saved["ticks"] = [t.get_window_extent(r) for t in ax.get_xticklabels()
                          if t.get_text()]
        saved["texts"] = [t.get_window_extent(r) for t in (
            ax.title, ax.xaxis.label, ax.yaxis.label, cax.yaxis.label,
            *ax.get_xticklabels(), *ax.get_yticklabels()) if t.get_text()]
        saved["gaps"] = [t.get_window_extent(r) for t in ax.texts]
        saved["cbar"] = cax.get_window_extent(r)

    Figure.savefig = grab
    try:
        heatmap.to_png(rec, h, str(tmp_path / "h.png"), width, height)
    finally:
        Figure.savefig = orig
    return saved


@pytest.mark.parametrize("size", [(1200, 700), (800, 500)])
def test_heatmap_png_labels_fit_and_do_not_overlap(demo, gappy, tmp_path, size):
    for rec in (demo / "demo.jsonl", gappy):
        b = _png_layout(rec, *size, tmp_path)
        fig = b["fig"]
        for t in b["texts"]:  # every label inside the image
            assert t.x0 >= -0.5 and t.y0 >= -0.5 and t.x1 <= fig.x1 + 0.5 \
                and t.y1 <= fig.y1 + 0.5, (rec, size, t)
        ticks = sorted(b["ticks"], key=lambda t: t.x0)
        assert len(ticks) >= 2
        for a, c in zip(ticks, ticks[1:], strict=False):
            assert a.x1 < c.x0, (rec, size, a, c)  # tick labels never overlap
        assert b["gaps"], rec
        for g in b["gaps"]:  # gap labels inside the plot, clear of the colour bar
            assert b["ax"].x0 <= g.x0 and g.x1 <= b["ax"].x1 and g.x1 < b["cbar"].x0


def _as_wp(src, dst, filters=None):
    """A copy of a --write-only record as the wp primitive writes it: no sample
    filters (wp sees only writes anyway), primitive "wp"."""
    lines = src.read_text().splitlines()
    head = json.loads(lines[0])
    head["primitive"], head["filters"], head["coverage"] = "wp", filters or [], "controlled"
    dst.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")


def test_wp_record_writes_come_from_nr_accesses(demo, tmp_path):
    wo = tmp_path / "wo.jsonl"
    run_udamon("record", "--input", str(demo / "demo.csv"), "-q", "--seed", "1",
               "--write-only", "--breakdown", "cpu", "-o", str(wo), check=True)
    wp = tmp_path / "wp.jsonl"
    _as_wp(wo, wp)
    text = report("ksm", "-i", str(wp), "--min-age", "500ms").stdout
    assert "writes from: nr_accesses (wp sees only writes)" in text
    assert "reads from: unknown (wp sees only writes)" in text
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("  0x")]
    assert rows and all(r[-1] == "unknown" for r in rows)  # never "no": wp cannot see reads
    doc = json.loads(report("ksm", "-i", str(wp), "--format", "json").stdout)
    assert doc["writes_from"] == "nr_accesses" and doc["reads_from"] is None
    assert all(c["read_bytes"] is None for c in doc["targets"][0]["candidates"])
    assert doc["targets"][0]["candidate_bytes"] >= 31 * MiB  # R and I
    assert "writes from: nr_accesses (wp sees only writes)" in report("dirty", "-i",
                                                                      str(wp)).stdout
    assert json.loads(report("dirty", "-i", str(wp), "--format", "json").stdout
                      )["targets"][0]["mean_bps"] > 0
    # sample filters other than 'write' keep only some writes: not a write source
    flt = tmp_path / "wpc.jsonl"
    _as_wp(wo, flt, [{"type": "cpus", "value": "1", "matching": False, "allow": False}])
    p = report("dirty", "-i", str(flt), check=False)
    assert p.returncode == 2 and "only the writes that pass" in p.stderr
    assert len(p.stderr.splitlines()) == 1


def test_wss_time_slices_are_uniform(tmp_path):
    run_udamon("synth", "-o", str(tmp_path / "d.csv"), "--duration", "3s", check=True)
    run_udamon("record", "--input", str(tmp_path / "d.csv"), "-q", "--seed", "1",
               "-o", str(tmp_path / "d.jsonl"), check=True)  # 30 snapshots of 100 ms
    for resol, step in ((20, 0.2), (7, 0.5), (30, 0.1), (50, 0.1)):
        out = report("wss", "-i", str(tmp_path / "d.jsonl"), "--resol-time", str(resol)).stdout
        body = out[out.index("over time"):].splitlines()[2:]
        until = [float(ln.split()[0]) * (1e-3 if ln.split()[1] == "ms" else 1)
                 for ln in body if ln.strip()]
        assert len(until) <= resol
        assert np.allclose(np.diff(until), step), (resol, until)
        assert until[-1] == pytest.approx(3.0)


@pytest.mark.parametrize("kind", ["access", "heatmap", "wss", "ksm", "dirty", "sharing",
                                  "numa"])
def test_format_choices_are_the_kinds_own(demo, kind):
    formats = {"heatmap": "{text,json,png}"}.get(kind, "{text,json}")
    assert f"--format {formats}" in report(kind, "--help").stdout
    if kind != "heatmap":
        p = report(kind, "-i", "demo.jsonl", "--format", "png", "-o", "f.png", cwd=demo,
                   check=False)
        assert p.returncode == 2 and "invalid choice: 'png'" in p.stderr
        assert len(p.stderr.splitlines()) == 1 and p.stdout == ""
        assert not (demo / "f.png").exists()


@pytest.mark.parametrize("kind", ["access", "heatmap", "wss", "ksm", "dirty", "sharing",
                                  "numa"])
def test_a_record_without_snapshots_is_an_error_for_every_kind(demo, tmp_path, kind):
    head = (demo / "demo.jsonl").read_text().splitlines()[0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(head + "\n" + json.dumps({"end": {
        "reason": "duration", "dropped_reports": 0, "lost_samples": 0, "snapshots": 0}}) + "\n")
    p = report(kind, "-i", str(empty), check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert "has no snapshots" in p.stderr and len(p.stderr.splitlines()) == 1


def test_holes_between_mappings_are_not_memory(tmp_path):
    """DAMON's three regions span the unmapped holes between mappings; a live record
    says what is mapped, and ksm, wss and the heatmap count only that.  Here a
    400 MiB hole lies between 4 MiB that is written and 64 MiB that is not."""
    from udamon import Attrs, Monitor, Probe, parse_conditions
    from udamon.core.monitor import Snapshot
    from udamon.record.reader import read_record
    from udamon.record.writer import RecordWriter, build_header
    from udamon.report.common import AddrAxis

    a, b = 0x5600_0000_0000, 0x5600_0000_0000 + 404 * MiB
    probes = [Probe("write", parse_conditions("write"))]
    mon = Monitor(Attrs(sample_us=50_000, aggr_us=1_000_000), probes=probes)
    mon.add_target(7, [(a, b + 64 * MiB)], name="app")
    path = tmp_path / "holes.jsonl"
    w = RecordWriter(str(path))
    w.write_header(build_header(mon.attrs, "wp", "controlled", [], probes, mon.targets))
    mapped = [(a, a + 4 * MiB), (b, b + 64 * MiB)]
    for k in range(12):
        start = np.array([a, a + 4 * MiB, b], dtype=np.uint64)
        end = np.array([a + 4 * MiB, b, b + 64 * MiB], dtype=np.uint64)
        hits = np.array([10, 0, 0], dtype=np.int64)
        w.write_snapshot(Snapshot((k + 1) * 10**9, k * 10**9, 7, 50_000, start, end, hits,
                                  np.array([k, k, k]), {"write": hits.copy()},
                                  mapped=mapped if k == 0 else None))
    w.close("duration")
    assert read_record(str(path)).snapshots[-1].mapped == mapped  # carried forward

    ksm = json.loads(report("ksm", "-i", str(path), "--min-age", "5s", "--format",
                            "json").stdout)
    (t,) = ksm["targets"]
    assert [(c["start"], c["end"]) for c in t["candidates"]] == [(b, b + 64 * MiB)]
    assert t["mapped"] == 68 * MiB
    wss = json.loads(report("wss", "-i", str(path), "--format", "json").stdout)
    series = wss["targets"][0]["series"]
    assert {s["mapped"] for s in series} == {68 * MiB}
    assert {s["wss"] for s in series} == {4 * MiB}
    axis = AddrAxis.of(read_record(str(path)).snapshots)
    assert axis.segments == mapped  # the hole is cut out of the heatmap's address axis


def test_access_sum_adds_every_snapshot_up(demo):
    """--snapshot sum: per address, nr_accesses and probe hits summed over the whole
    record (byte-weighted totals are conserved); the read-only buffer has no write."""
    from udamon.record.reader import read_record

    rec = read_record(str(demo / "demo.jsonl"))
    doc = json.loads(report("access", "-i", "demo.jsonl", "--snapshot", "sum", "--format",
                            "json", cwd=demo).stdout)
    (t,) = doc["targets"]
    (snap,) = t["snapshots"]
    regs = snap["regions"]
    for key in ("nr_accesses", "write"):
        def val(r, key=key):
            return r["nr_accesses"] if key == "nr_accesses" else r["probes"][key]
        got = sum(val(r) * r["size"] for r in regs)
        want = sum(int(((s.end - s.start).astype(np.int64)
                        * (s.nr_accesses if key == "nr_accesses" else s.probe_hits[key])).sum())
                   for s in rec.snapshots)
        assert got == want, key
    assert all(a["end"] <= b["start"] for a, b in zip(regs, regs[1:], strict=False))
    assert snap["nr_reports"] == sum(s.nr_reports for s in rec.snapshots)
    base = regs[0]["start"]
    lo, hi = (base + x * MiB for x in DEMO_BUFFERS["R"])  # R: read all along, never written
    inside = [r for r in regs if lo <= r["start"] and r["end"] <= hi]
    assert inside and all(r["probes"]["write"] == 0 and r["nr_accesses"] > 0 for r in inside)


def test_every_kind_is_an_object_the_library_runs_as_the_cli_does(demo, monkeypatch):
    """udamon.report.kind.KINDS: the CLI's one runner is the library's; a kind run from
    Python writes what 'udamon report KIND' prints (text) and the same JSON."""
    from udamon.errors import ParameterError
    from udamon.record.reader import read_record
    from udamon.report.kind import KINDS

    assert list(KINDS) == ["access", "heatmap", "wss", "ksm", "dirty", "sharing", "numa"]
    monkeypatch.chdir(demo)  # the record's path as the CLI gets it
    rec = read_record("demo.jsonl")
    for name, kind in KINDS.items():
        opts = kind.options()
        if name == "heatmap":  # the CLI's text defaults
            opts = kind.options(cols=60, rows=30)
        cli = report(name, "-i", "demo.jsonl", *(["--color", "never"] if name == "heatmap"
                                                  else []), cwd=demo).stdout
        assert kind.run(rec, "text", opts) == cli, name
        if name == "heatmap":  # and its JSON defaults
            opts = kind.options(cols=600, rows=300)
        doc = json.loads(report(name, "-i", "demo.jsonl", "--format", "json", cwd=demo).stdout)
        assert json.loads(json.dumps(kind.run(rec, "json", opts))) == doc, name
    with pytest.raises(ParameterError) as e:
        KINDS["numa"].run(rec, "png")
    assert e.value.param == "format" and "--" not in str(e.value)
