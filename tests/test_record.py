"""Record files: round trip, gzip, and clear errors that say where a file is damaged."""

import gzip
import json

import numpy as np
import pytest

import udamon
from udamon import Attrs, Monitor, Probe, parse_conditions
from udamon.errors import InputError
from udamon.record.reader import read_record
from udamon.record.writer import RecordWriter, build_header

MS = 1_000_000
BASE = 0x4000_0000


def write_sample(path, snaps=3, end=True):
    probes = [Probe.parse("w=write"), Probe.parse("c1=cpus:1")]
    mon = Monitor(Attrs(min_nr_regions=3, max_nr_regions=6),
                  filters=parse_conditions("cpus:0-1"), probes=probes, seed=1)
    mon.add_target(5, [(BASE, BASE + 12 * 4096)], name="t")
    w = RecordWriter(str(path))
    w.write_header(build_header(mon.attrs, "replay", "complete", mon.filters, mon.probes,
                                mon.targets))
    mon.start(0)
    out = []
    for k in range(snaps):
        mon.report_batch(udamon.make_reports(time_ns=k * 100 * MS + np.arange(10) * MS, pid=5,
                                             addr=BASE + 4096 * (np.arange(10) % 12), cpu=1,
                                             write=True))
        for s in mon.advance((k + 1) * 100 * MS):
            w.write_snapshot(s)
            out.append(s)
    if end:
        w.close("input-exhausted", dropped_reports=2, lost_samples=3)
    else:
        w.abandon()
    return out


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz"])
def test_round_trip(tmp_path, name):
    path = tmp_path / name
    written = write_sample(path)
    if name.endswith(".gz"):
        with open(path, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"
    rec = read_record(str(path))
    assert rec.complete and rec.end["reason"] == "input-exhausted"
    assert rec.end["dropped_reports"] == 2 and rec.end["lost_samples"] == 3
    assert rec.probe_names == ["w", "c1"]
    assert rec.filters == list(parse_conditions("cpus:0-1"))
    assert len(rec.snapshots) == len(written) == 3
    for a, b in zip(written, rec.snapshots, strict=True):
        assert (a.start == b.start).all() and (a.nr_accesses == b.nr_accesses).all()
        assert (a.age == b.age).all() and a.time_ns == b.time_ns
        for n in ("w", "c1"):
            assert (a.probe_hits[n] == b.probe_hits[n]).all()
    assert rec.snapshots[0].nr_accesses.sum() > 0


def test_header_and_snapshot_follow_the_contract(tmp_path):
    path = tmp_path / "r.jsonl"
    write_sample(path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    h = lines[0]
    assert h["format"] == "udamon-record" and h["version"] == 1
    for k in ("attrs", "primitive", "filters", "probes", "targets"):
        assert k in h
    assert h["probes"][0] == {"name": "w", "filters": [
        {"type": "write", "value": None, "matching": False, "allow": False}]}
    s = lines[1]
    for k in ("time_ns", "pid", "sample_us", "regions"):
        assert k in s
    assert set(s["regions"][0]) >= {"start", "end", "nr_accesses", "age", "probes"}
    assert set(s["regions"][0]["probes"]) == {"w", "c1"}
    assert set(lines[-1]["end"]) >= {"reason", "dropped_reports", "lost_samples"}


def test_incomplete_record_is_readable(tmp_path):
    path = tmp_path / "r.jsonl"
    write_sample(path, end=False)
    rec = read_record(str(path))
    assert not rec.complete and len(rec.snapshots) == 3


def damage(path, fn):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(fn(lines)))


@pytest.mark.parametrize("fn,where,msg", [
    (lambda ls: ls[:2] + [ls[2][:40]], 3, "cut off"),
    (lambda ls: ls[:2] + ["{not json\n"] + ls[3:], 3, "not valid JSON"),
    (lambda ls: [ls[0].replace("udamon-record", "other")] + ls[1:], 1, "not a udamon record"),
    (lambda ls: [ls[0].replace('"version":1', '"version":9')] + ls[1:], 1, "version 9"),
    (lambda ls: ls[:1] + [ls[1].replace('"nr_accesses"', '"nr_x"')] + ls[2:], 2, "nr_accesses"),
    (lambda ls: ls[:1] + [ls[1].replace('"age":0', '"age":-1', 1)] + ls[2:], 2, "age"),
    (lambda ls: ls[:1] + [ls[1].replace('"c1"', '"zz"', 1)] + ls[2:], 2, "not declared"),
    (lambda ls: ls + ["{}\n"], 6, "after the end line"),
    (lambda ls: ls[:1] + ['{"time_ns":1,"pid":5,"sample_us":5000,"regions":[{"start":10,'
                          '"end":5,"nr_accesses":0,"age":0}]}\n'] + ls[1:], 2, "above start"),
])
def test_damage_is_reported_with_its_line(tmp_path, fn, where, msg):
    path = tmp_path / "r.jsonl"
    write_sample(path)
    damage(path, fn)
    with pytest.raises(InputError) as e:
        read_record(str(path))
    text = str(e.value)
    assert f"r.jsonl:{where}:" in text and msg in text, text
    assert "\n" not in text


def test_salvage_reads_up_to_the_damage(tmp_path):
    path = tmp_path / "r.jsonl"
    write_sample(path)
    damage(path, lambda ls: ls[:3] + [ls[3][:30]])
    with pytest.raises(InputError, match="2 snapshots before it are intact"):
        read_record(str(path))
    rec = read_record(str(path), salvage=True)
    assert len(rec.snapshots) == 2 and "r.jsonl:4" in rec.damage


def test_streaming_reader_reads_one_snapshot_at_a_time(tmp_path):
    """RecordReader: the header before any snapshot, snapshots as the file is read
    (a line appended after the reader started is still seen: nothing was read
    ahead), the end once the stream is over; damage mid-stream after the intact
    snapshots have been yielded."""
    from udamon.errors import RecordDamaged
    from udamon.record.reader import iter_record

    path = tmp_path / "r.jsonl"
    written = write_sample(path, snaps=4, end=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))  # header + 2 snapshots
    with iter_record(str(path)) as r:
        assert r.probe_names == ["w", "c1"] and r.end is None
        it = iter(r)
        first = next(it)
        assert first.time_ns == written[0].time_ns and r.snapshots_read == 1
        with open(path, "a") as f:  # the writer goes on while the reader reads
            f.writelines(lines[3:])
            f.write('{"end":{"reason":"duration","dropped_reports":0,"lost_samples":0,'
                    '"snapshots":4}}\n')
        rest = list(it)
        assert [s.time_ns for s in rest] == [s.time_ns for s in written[1:]]
        assert r.end["reason"] == "duration" and r.damage is None
    damage(path, lambda ls: ls[:3] + ["{bad\n"] + ls[4:])
    got = []
    with pytest.raises(RecordDamaged) as e, iter_record(str(path)) as r:
        got.extend(r)
    assert len(got) == 2 and e.value.intact == 2 and "r.jsonl:4" in str(e.value)
    with iter_record(str(path), salvage=True) as r:
        assert len(list(r)) == 2 and "r.jsonl:4" in r.damage


def test_page_nodes_round_trip_as_a_matrix(tmp_path):
    """Snapshot.page_nodes (regions x nodes pages) is written as each region's
    "nodes" object and read back as the same matrix."""
    snap = write_sample(tmp_path / "a.jsonl", snaps=1)[0]
    n = snap.start.size
    snap.page_nodes = np.zeros((n, 3), dtype=np.int64)
    snap.page_nodes[0, 2] = 5
    snap.page_nodes[n - 1, 0] = 1
    path = tmp_path / "b.jsonl"
    w = RecordWriter(str(path))
    w.write_header(json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0]))
    w.write_snapshot(snap)
    w.close("duration")
    line = json.loads(path.read_text().splitlines()[1])
    assert line["regions"][0]["nodes"] == {"2": 5} and line["regions"][1]["nodes"] == {}
    back = read_record(str(path)).snapshots[0]
    assert back.page_nodes.shape == (n, 3) and (back.page_nodes == snap.page_nodes).all()
    assert back.region_page_nodes()[0] == {2: 5}


def test_lost_snapshot_lines_are_noticed(tmp_path):
    """Every remaining line is valid; only the end line's count tells that one is gone."""
    import subprocess
    import sys

    path = tmp_path / "r.jsonl"
    write_sample(path)
    assert json.loads(path.read_text().splitlines()[-1])["end"]["snapshots"] == 3
    damage(path, lambda ls: ls[:2] + ls[3:])
    with pytest.raises(InputError) as e:
        read_record(str(path))
    text = str(e.value)
    assert "says 3 snapshots but 2 were found" in text and "salvaging read" in text
    assert "\n" not in text
    rec = read_record(str(path), salvage=True)
    assert len(rec.snapshots) == 2 and "says 3 snapshots" in rec.damage
    for extra, rc in (([], 2), (["--salvage"], 0)):
        p = subprocess.run([sys.executable, "-m", "udamon", "report", "wss", "-i", str(path),
                            *extra], capture_output=True, text=True, timeout=60)
        assert p.returncode == rc and len(p.stderr.splitlines()) == 1, p.stderr
        assert "says 3 snapshots but 2 were found" in p.stderr
        assert ("warning" in p.stderr) == (rc == 0)


def test_truncated_gzip_is_reported(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    write_sample(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|cut off|corrupted"):
        read_record(str(path))


def test_not_a_record(tmp_path):
    for content, msg in ((b"", "empty file"), (b"hello\n", "not valid JSON"),
                         (gzip.compress(b"[1,2]\n"), "JSON object")):
        p = tmp_path / "x"
        p.write_bytes(content)
        with pytest.raises(InputError, match=msg):
            read_record(str(p))
    with pytest.raises(InputError, match="no such file"):
        read_record(str(tmp_path / "nope"))
