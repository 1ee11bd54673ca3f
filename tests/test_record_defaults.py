"""One record for every question: a live record's default breakdown (auto), and
report tables that stay readable however many probes a record has."""

from __future__ import annotations

import pytest
from conftest import run_udamon

from udamon.probes.breakdown import MAX_THREAD_PROBES, expand_auto
from udamon.record.reader import read_record


def test_auto_takes_what_fits_and_says_what_not():
    kinds, notes = expand_auto(["auto"], ncpus=2, nnodes=1, ntids=3)
    assert kinds == ["cpu", "rw", "thread"] and notes == []
    kinds, notes = expand_auto(["auto"], ncpus=2, nnodes=2, ntids=MAX_THREAD_PROBES + 1)
    assert kinds == ["cpu", "rw", "node"]
    assert len(notes) == 1 and f"{MAX_THREAD_PROBES + 1} threads" in notes[0]
    kinds, notes = expand_auto(["auto"], ncpus=256, nnodes=4, ntids=1)
    assert kinds == ["rw", "node", "thread"] and "256 CPUs" in notes[0]
    assert expand_auto(["numa", "auto"], ncpus=1, nnodes=1, ntids=1)[0] == [
        "numa", "cpu", "rw", "thread"]
    assert expand_auto(["cpu"], ncpus=1, nnodes=1, ntids=1) == (["cpu"], [])


def test_live_record_defaults_to_auto_and_none_turns_it_off(tmp_path):
    from udamon.primitives.registry import entry

    ok, why = entry("hint").available()
    if not ok:
        pytest.skip(f"hint unavailable: {why}")
    for extra, want in (([], True), (["--breakdown", "none"], False)):
        out = tmp_path / f"r{len(extra)}.jsonl"
        p = run_udamon("record", "--primitive", "hint", "--duration", "1s", "-q", "-o",
                       str(out), *extra, "--", "sleep", "2", timeout=60)
        assert p.returncode == 0, p.stderr
        names = read_record(str(out)).probe_names
        has = {k: any(n.startswith(k) for n in names) for k in ("cpu:", "thread:")}
        assert (has["cpu:"] and has["thread:"] and {"write", "read"} <= set(names)) == want
        assert bool(names) == want, names


@pytest.fixture(scope="module")
def many_probes(tmp_path_factory):
    d = tmp_path_factory.mktemp("cols")
    csv, rec = d / "s.csv", d / "r.jsonl"
    assert run_udamon("synth", "-o", str(csv), "--duration", "1s").returncode == 0
    p = run_udamon("record", "--input", str(csv), "-o", str(rec), "-q", "--breakdown",
                   "cpu,thread,rw", "--probe", "mine=write", "--probe",
                   "long_probe_name_a=cpus:0", "--probe", "long_probe_name_b=cpus:1")
    assert p.returncode == 0, p.stderr
    return rec


def _table_header(out: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("start "))
    assert len(line) <= 120, line
    return line.split()[6:]


def test_table_fits_and_keeps_the_users_probes(many_probes):
    p = run_udamon("report", "access", "-i", str(many_probes))
    assert p.returncode == 0, p.stderr
    cols = _table_header(p.stdout)
    names = read_record(str(many_probes)).probe_names
    assert len(names) == 10 and len(cols) < len(names)
    assert cols[:3] == ["mine", "long_probe_name_a", "long_probe_name_b"]
    assert f"{len(cols)} of 10 probes fit in 120" in p.stdout
    table = [ln for ln in p.stdout.splitlines() if ln.startswith("  ")]
    assert len(table) > 10 and max(len(ln) for ln in table) <= 120


def test_columns_picks_and_wide_shows_all(many_probes):
    p = run_udamon("report", "access", "-i", str(many_probes), "--columns", "thread:*")
    assert p.returncode == 0, p.stderr
    cols = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("start "))
    assert cols.split()[6:] == ["thread:4242", "thread:4243", "thread:4244"]
    p = run_udamon("report", "access", "-i", str(many_probes), "--wide")
    line = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("start "))
    assert len(line.split()[6:]) == 10


@pytest.mark.parametrize("args", [["--columns", ","], ["--columns", "write", "--wide"]])
def test_bad_columns(many_probes, args):
    p = run_udamon("report", "access", "-i", str(many_probes), *args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_one_default_record_answers_every_report(tmp_path, access_pattern_bin):
    """issue 15: from one default 'udamon record --pid P', report numa, sharing, dirty
    and a CPU breakdown work without recording again (or say in one line why not)."""
    import signal

    from conftest import start_workload

    from udamon.primitives.registry import entry

    ok, why = entry("hint").available()
    if not ok:
        pytest.skip(f"hint unavailable: {why}")
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "8")
    out = tmp_path / "r.jsonl"
    try:
        p = run_udamon("record", "--pid", str(info["pid"]), "--duration", "4s", "-q",
                       "-o", str(out), timeout=90)
        assert p.returncode == 0, p.stderr
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0
    names = read_record(str(out)).probe_names
    assert {"cpu:0", "cpu:1", f"thread:{info['reader_tid']}", "write"} <= set(names), names
    for kind in ("numa", "sharing", "dirty", "wss", "heatmap"):
        p = run_udamon("report", kind, "-i", str(out))
        assert p.returncode == 0 or (p.returncode == 2 and len(
            p.stderr.strip().splitlines()) == 1), (kind, p.stderr)
        assert "Traceback" not in p.stderr
        print(kind, p.returncode, (p.stdout or p.stderr).splitlines()[:2])
    p = run_udamon("report", "access", "-i", str(out), "--snapshot", "sum",
                   "--columns", "cpu:*")
    assert p.returncode == 0 and "cpu:0" in p.stdout, p.stderr
