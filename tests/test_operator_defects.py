"""The defects an operator hit on redis and sqlite (issue 15, "What an operator trips
over"), each reproduced against the real CLI or the real mechanism: a replay CSV with a
comment line, a second wp session, summed ages, KSM candidates in file mappings, kernel
threads and zombie leaders as targets, the name of a launched command, report numa on a
--breakdown cpu,rw record, migrate on one node, negative durations, the demo's story,
and a state file left by a SIGKILL mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import buffer_hits, buffers_span, run_udamon, start_workload

import udamon
from udamon.primitives.registry import entry
from udamon.record.reader import read_record

HERE = Path(__file__).resolve().parent
HEADER = "time_ns,pid,tid,cpu,addr,size,write\n"
ROOT = os.geteuid() == 0


def one_line(p, code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    return lines[0]


def _campaign():
    sys.path.insert(0, str(HERE))
    from workloads.build import BuildError, build

    try:
        return build("campaign")
    except BuildError as e:
        pytest.skip(f"cannot build the workload: {e}")


def _start(binary: str, *args: str) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, text=True)
    return p, json.loads(p.stdout.readline())


def _end(p: subprocess.Popen, timeout: float = 30) -> dict:
    out, _ = p.communicate(timeout=timeout)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return lines[-1] if lines else {}


# -- 1. a comment line in a replay CSV ---------------------------------------------------


def test_replay_csv_comment_lines_are_skipped(tmp_path):
    """It was 'internal error: ValueError: could not broadcast input array from shape
    (65535,) into shape (65536,)': np.loadtxt dropped the comment, the table was short."""
    rows = [f"{i * 1_000_000},1,1,{i % 2},{4096 * (1 + i % 64)},8,{i % 3 == 0:d}"
            for i in range(3000)]
    plain = tmp_path / "plain.csv"
    plain.write_text(HEADER + "\n".join(rows) + "\n")
    commented = tmp_path / "commented.csv"
    body = rows[:10] + ["# a comment in the middle", "  # an indented one"] + rows[10:]
    commented.write_text("# produced by a script\n" + HEADER + "\n".join(body) + "\n# end\n")
    recs = {}
    for src in (plain, commented):
        out = tmp_path / f"{src.stem}.jsonl"
        p = run_udamon("record", "--input", str(src), "--seed", "3", "--breakdown", "cpu",
                       "-q", "-o", str(out))
        assert p.returncode == 0, p.stderr
        recs[src.stem] = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert recs["commented"][-1]["end"]["reports"] == 3000
    assert recs["commented"][1:] == recs["plain"][1:]  # same snapshots, same end
    # through the report channel's stdin (the same parser): time 0 = on arrival
    out = tmp_path / "stdin.jsonl"
    me = os.getpid()
    text = (HEADER + "# a comment\n" + "".join(f"0,{me},{me},0,{4096 * (1 + i % 64)},8,1\n"
                                               for i in range(50)) + "# the end\n")
    p = subprocess.run([sys.executable, "-m", "udamon", "record", "--input", "-", "--pid", str(me),
                        "--range", "0x1000-0x100000", "-q", "-o", str(out)],
                       input=text, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text().splitlines()[-1])["end"]["reports"] == 50
    # a '#' inside a report line is that line's error, not a shorter table
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + rows[0] + "\n" + rows[1] + " # note\n")
    msg = one_line(run_udamon("record", "--input", str(bad), "-o", str(tmp_path / "b.jsonl")), 2)
    assert f"{bad}:3:" in msg and "'write'" in msg


def test_a_thread_unknown_in_the_numa_counts_reads_back(tmp_path):
    """Found with the KSM test: wp reports the kernel's writes with tid -1, the
    snapshot's numa counts then had a thread "-1", and the reader refused the record
    ("numa threads must map thread ids ...").  Records now say "unknown"; those
    written before are read too."""
    src = tmp_path / "u.csv"
    src.write_text("time_ns,pid,tid,cpu,addr,size,write,page_node\n"
                   + "".join(f"{i * 1_000_000},5,{-1 if i % 3 else 5},{-1 if i % 3 else 0},"
                             f"{0x10000 + 4096 * (i % 16)},8,1,0\n" for i in range(300)))
    out = tmp_path / "u.jsonl"
    run_udamon("record", "--input", str(src), "-q", "-o", str(out), check=True)
    old = tmp_path / "old.jsonl"  # as udamon wrote it before
    old.write_text(out.read_text().replace('"unknown":[', '"-1":['))
    assert '"-1":[' in old.read_text()
    for path, key in ((out, "unknown"), (old, "-1")):
        rec = read_record(str(path))
        assert sum(s.numa["threads"].get(key, [0, 0, 0])[2] for s in rec.snapshots) == 200
        run_udamon("report", "numa", "-i", str(path), check=True)


# -- 2. a second wp session on the same process ---------------------------------------------

_wp_ok, _wp_why = entry("wp").available()


@pytest.mark.skipif(not _wp_ok, reason=f"wp unavailable: {_wp_why}")
def test_second_wp_session_is_refused_and_the_first_is_unharmed(tmp_path, access_pattern_bin):
    """It recorded '0 reports', exit 0, which reads as 'no writes'."""
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "16")
    first_rec = tmp_path / "first.jsonl"
    try:
        first = subprocess.Popen(
            [sys.executable, "-m", "udamon", "record", "--primitive", "wp", "--pid",
             str(info["pid"]), "--range", buffers_span(info), "--duration", "6s", "-q",
             "-o", str(first_rec)], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # registered once its snapshots come
            if first_rec.exists() and len(first_rec.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first session wrote no snapshot")
        second_rec = tmp_path / "second.jsonl"
        p = run_udamon("record", "--primitive", "wp", "--pid", str(info["pid"]),
                       "--duration", "2s", "-o", str(second_rec), timeout=60)
        msg = one_line(p, 1)
        assert "already registered with another userfaultfd" in msg
        assert not second_rec.exists()
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0, "the workload's data was damaged"
    rec = read_record(str(first_rec))
    assert rec.complete and rec.end["reason"] == "duration"
    assert buffer_hits(rec, *info["W"])["nr_accesses"] >= 10  # the first still saw writes


# -- 3. report access --snapshot sum summed the ages ---------------------------------------


def test_summed_table_ages_are_the_last_snapshots(tmp_path):
    """It showed 'age 11.8 m' in a 15 s record: the last age times the whole span."""
    rows = []
    for i in range(1500):  # 15 s: one page hot all along, another only in the first second
        rows.append(f"{i * 10_000_000},7,7,0,{0x10000},8,1")
        if i < 100:
            rows.append(f"{i * 10_000_000 + 1},7,7,0,{0x900000},8,0")
    src = tmp_path / "a.csv"
    src.write_text(HEADER + "\n".join(rows) + "\n")
    out = tmp_path / "a.jsonl"
    run_udamon("record", "--input", str(src), "--range", "0x0-0x1000000", "-q", "-o",
               str(out), check=True)
    rec = read_record(str(out))
    span = rec.snapshots[-1].time_ns - rec.snapshots[0].start_ns
    doc = json.loads(run_udamon("report", "access", "-i", str(out), "--snapshot", "sum",
                                "--format", "json", check=True).stdout)
    regions = doc["targets"][0]["snapshots"][0]["regions"]
    last = rec.snapshots[-1]
    assert max(r["age_ns"] for r in regions) <= span
    assert max(r["age_ns"] for r in regions) >= 10e9  # the idle part aged ~14 s
    assert max(r["age"] for r in regions) <= len(rec.snapshots)
    assert {r["age"] for r in regions} <= set(last.age.tolist())  # the last snapshot's
    text = run_udamon("report", "access", "-i", str(out), "--snapshot", "sum",
                      check=True).stdout
    assert " m " not in text and " h " not in text, text


# -- 4. KSM candidates in file mappings and the stack --------------------------------------


def _vmas(pid: int) -> list[tuple[int, int, str, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


@pytest.mark.skipif(not _wp_ok, reason=f"wp unavailable: {_wp_why}")
def test_ksm_candidates_are_private_anonymous_memory_only(tmp_path, access_pattern_bin):
    """It listed the program image, shared libraries and [stack]; KSM merges only
    private anonymous pages."""
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "8")
    try:
        vmas = _vmas(info["pid"])
        out = tmp_path / "k.jsonl"
        p = run_udamon("record", "--primitive", "wp", "--pid", str(info["pid"]),
                       "--duration", "3s", "-q", "-o", str(out), timeout=60)
        assert p.returncode == 0, p.stderr
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0
    not_anon = [(lo, hi, path) for lo, hi, perms, path in vmas
                if path.startswith("/") or path == "[stack]" or perms[3] == "s"
                or path in ("[vdso]", "[vvar]", "[vvar_vclock]")]
    assert any(path.startswith("/") for _, _, path in not_anon)  # the image, libc
    doc = json.loads(run_udamon("report", "ksm", "-i", str(out), "--format", "json",
                                "--min-age", "1s", check=True).stdout)
    t = doc["targets"][0]
    assert t["candidates"]
    for c in t["candidates"]:
        for lo, hi, path in not_anon:
            assert c["end"] <= lo or c["start"] >= hi, (hex(c["start"]), hex(c["end"]), path)
    assert t["anonymous_only"] is True
    # the written buffer W is never a candidate; the never-written R and I hold some
    # (region boundaries are DAMON's: a region across I and W is written)
    def overlap(lo, hi):
        return sum(max(0, min(c["end"], hi) - max(c["start"], lo)) for c in t["candidates"])

    assert overlap(*info["W"]) <= 0.05 * (info["W"][1] - info["W"][0])
    assert overlap(*info["R"]) + overlap(*info["I"]) > 0
    assert "private anonymous memory" in run_udamon("report", "ksm", "-i", str(out),
                                                    check=True).stdout


# -- 5. kernel threads and zombie leaders ------------------------------------------------


def _kthread() -> int:
    from udamon.targets.procmaps import kernel_thread_name

    for pid in (2, 3, 4, 5):
        if kernel_thread_name(pid) is not None:
            return pid
    pytest.skip("no kernel thread found")


@pytest.mark.parametrize("argv", [
    ["record", "--primitive", "hint", "-o", "{out}"],
    ["record", "--primitive", "wp", "-o", "{out}"],
    ["record", "--primitive", "rwp", "-o", "{out}"],
    ["record", "--primitive", "pmu", "-o", "{out}"],
    ["record", "--primitive", "external", "--socket", "{sock}", "-o", "{out}"],
    ["monitor"],
    ["exporter", "--port", "0"],
    ["migrate", "--dry-run"],
])
def test_a_kernel_thread_is_named_as_such(tmp_path, argv):
    """hint said 'process 2 does not exist', wp gave ptrace advice."""
    pid = _kthread()
    argv = [a.format(out=tmp_path / "k.jsonl", sock=tmp_path / "s.sock") for a in argv]
    msg = one_line(run_udamon(*argv, "--pid", str(pid), "--duration", "1s", timeout=60), 2)
    assert f"process {pid} (" in msg and "is a kernel thread" in msg
    assert not (tmp_path / "k.jsonl").exists()


_hint_ok, _hint_why = entry("hint").available()


@pytest.mark.parametrize("prim", ["hint", "wp"])
def test_a_process_whose_main_thread_exited_is_monitored(tmp_path, prim):
    """It was 'process P has exited' (exit 2): /proc/P/maps is empty once the main
    thread has exited, while the workers run on."""
    ok, why = entry(prim).available()
    if not ok:
        pytest.skip(f"{prim} unavailable: {why}")
    wl, info = _start(_campaign(), "zombie", "--duration", "30", "--size", "16")
    try:
        # the start line comes just before the main thread's pthread_exit()
        deadline, state = time.monotonic() + 10, ""
        while time.monotonic() < deadline:
            with open(f"/proc/{info['pid']}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state == "Z":  # a zombie leader
                break
            time.sleep(0.01)
        assert state == "Z", state
        lo, hi = info["buf"]
        out = tmp_path / "z.jsonl"
        p = run_udamon("record", "--primitive", prim, "--pid", str(info["pid"]),
                       "--range", f"{lo:#x}-{hi:#x}", "--regions", "16,100", "--duration",
                       "4s", "-q", "-o", str(out), timeout=90)
        assert p.returncode == 0, p.stderr
        rec = read_record(str(out))
        assert rec.end["reason"] == "duration" and len(rec.snapshots) >= 10
        assert rec.end["reports"] > 0
        if prim == "wp":  # controlled: the workers write the buffer all the time
            assert buffer_hits(rec, lo, hi)["nr_accesses"] >= 10
        # the session ends with the process, not with its main thread
        wl.send_signal(signal.SIGTERM)
        end = _end(wl)
        assert wl.returncode == 0 and end["intact"] is True
    finally:
        wl.kill()
        wl.wait()


# -- 6. the name of a launched command ----------------------------------------------------


def test_a_launched_command_is_named_after_what_it_execs():
    """Read before the exec had finished, the name was the forked udamon's ('bash' in 3
    of 8 runs there, 28 of 50 here with python3)."""
    from udamon.targets.launch import Launched
    from udamon.targets.procmaps import process_name

    want = os.path.basename(sys.executable)[:15]
    wrong = []
    for _ in range(25):
        lw = Launched([sys.executable, "-c", "import time; time.sleep(0.05)"])
        lw.release()
        name = process_name(lw.pid)
        lw.wait()
        if name != want:
            wrong.append(name)
    assert not wrong, wrong
    assert lw.comm == want


@pytest.mark.skipif(not _hint_ok, reason=f"hint unavailable: {_hint_why}")
def test_a_launched_python_target_is_recorded_with_its_name(tmp_path):
    out = tmp_path / "l.jsonl"
    run_udamon("record", "--primitive", "hint", "--duration", "1s", "-q", "-o", str(out),
               "--", sys.executable, "-c", "import time; time.sleep(2)", check=True,
               timeout=60)
    head = json.loads(out.read_text().splitlines()[0])
    assert head["targets"][0]["name"] == os.path.basename(sys.executable)[:15]


# -- 7. the README's sequence, migrate on one node, negative durations -----------------


def test_report_numa_on_a_cpu_rw_record_says_what_it_can_answer(tmp_path):
    """The README records with --breakdown cpu,rw and then shows report numa, which
    exited 2 asking for --breakdown node."""
    rng = np.random.default_rng(5)
    n = 4000
    cpu = rng.integers(0, 2, n)
    tid = 100 + cpu
    page_node = rng.integers(0, 2, n)
    page_node[:500] = cpu[:500]  # some more local
    rows = [f"{i * 1_000_000},9,{tid[i]},{cpu[i]},{cpu[i]},{0x100000 + 4096 * (i % 256)},64,"
            f"{i % 2},{page_node[i]}" for i in range(n)]
    src = tmp_path / "n.csv"
    src.write_text("time_ns,pid,tid,cpu,node,addr,size,write,page_node\n" + "\n".join(rows)
                   + "\n")
    out = tmp_path / "n.jsonl"
    run_udamon("record", "--input", str(src), "--breakdown", "cpu,rw", "-q", "-o", str(out),
               check=True)
    p = run_udamon("report", "numa", "-i", str(out))
    assert p.returncode == 0, p.stderr
    assert "not in this record: per-region local and remote" in p.stdout
    assert "--breakdown numa" in p.stdout
    doc = json.loads(run_udamon("report", "numa", "-i", str(out), "--format", "json",
                                check=True).stdout)
    assert doc["per_region"] is False and doc["cannot"]
    t = doc["targets"][0]
    local = int((cpu == page_node).sum())
    assert t["reports"] == {"local": local, "remote": n - local, "unknown": 0}
    assert t["local_ratio"] == pytest.approx(local / n)
    for th in (0, 1):
        sel = cpu == th
        v = t["threads"][str(100 + th)]
        assert v["local"] == int((page_node[sel] == th).sum())
    assert t["local"] is None and t["remote"] is None  # not per region: not guessed


_one_node = None
try:
    from udamon.targets.page_nodes import memory_nodes

    _one_node = len(memory_nodes()) == 1
except Exception:  # noqa: BLE001
    _one_node = False


@pytest.mark.skipif(not (_one_node and _hint_ok), reason="needs one NUMA node and hint")
def test_migrate_on_one_node_says_at_once_that_nothing_can_move():
    """It ran its whole --duration and said '0 B'."""
    t0 = time.monotonic()
    p = run_udamon("migrate", "--primitive", "hint", "--pid", str(os.getpid()), "--duration",
                   "60s", "--dry-run", timeout=30)
    assert time.monotonic() - t0 < 20
    assert p.returncode == 0, p.stderr
    assert "nothing would move: this machine has one NUMA node" in p.stderr
    doc = json.loads(run_udamon("migrate", "--primitive", "hint", "--pid", str(os.getpid()),
                                "--duration", "60s", "--format", "json", timeout=30,
                                check=True).stdout)
    assert doc["reason"] == "single-node" and doc["bytes_moved"] == 0
    # bad targets are still bad input
    one_line(run_udamon("migrate", "--primitive", "hint", "--pid", "999999", "--dry-run"), 2)


@pytest.mark.parametrize("argv", [
    ["record", "--pid", "1", "-o", "x.jsonl", "--duration", "-5s"],
    ["monitor", "--pid", "1", "--duration", "-5s"],
    ["migrate", "--pid", "1", "--duration", "-1m"],
    ["exporter", "--pid", "1", "--duration", "-0.5s"],
    ["record", "--pid", "1", "-o", "x.jsonl", "--sample", "-5ms"],
    ["record", "--pid", "1", "-o", "x.jsonl", "--aggr", "-.5s"],
    ["record", "--pid", "1", "-o", "x.jsonl", "--latency", "-1s"],
    ["monitor", "--pid", "1", "--latency", "-0.5s"],
])
def test_a_negative_duration_is_one_clear_line(tmp_path, argv):
    """--duration -5s gave argparse's 'expected one argument'."""
    msg = one_line(run_udamon(*argv, cwd=tmp_path), 2)
    assert "expected one argument" not in msg
    assert "must be positive" in msg or "cannot be negative" in msg, msg


# -- 8. the demo tells a story its own table supports ---------------------------------------


def test_demo_verdicts_follow_the_numbers():
    from udamon.cli.demo import verdict

    hint_s = {"cpu:0": 0, "cpu:1": 8, "read": 0, "write": 8}
    v = verdict("S", hint_s, "hint", "cpu:0", "cpu:1")
    assert "reads by cpu:0: 0 hits" in v and "no read seen" in v and "first access" in v
    assert "as the workload does" not in v
    both = {"cpu:0": 5, "cpu:1": 7, "read": 5, "write": 7}
    assert verdict("S", both, "rwp", "cpu:0", "cpu:1").endswith("as the workload does")
    assert "not observed" in verdict("R", dict.fromkeys(both, 0), "hint", "cpu:0", "cpu:1")
    assert "sampled and not accessed" in verdict("I", dict.fromkeys(both, 0), "rwp",
                                                 "cpu:0", "cpu:1")
    # hint,wp: the writes are wp's samples, the reads hint's
    wp_s = {"cpu:0": 0, "cpu:1": 9, "read": 0, "write": 9}
    v = verdict("S", wp_s, "hint,wp", "cpu:0", "cpu:1")
    assert "writes by cpu:1: 9 hits" in v and "no read seen" in v and "wp sees only" in v
    v = verdict("W", {"cpu:0": 0, "cpu:1": 0, "read": 0, "write": 0}, "hint,wp",
                "cpu:0", "cpu:1")
    assert "no write seen" in v and "wp samples" in v
    assert "wp sampled it" in verdict("I", dict.fromkeys(both, 0), "hint,wp", "cpu:0", "cpu:1")


def test_the_demo_takes_hint_and_wp_together_without_rwp():
    """Without rwp the demo's writes come from wp's samples, not from hint's first
    touches alone (issue 15 item 4: 'when hint,wp or rwp is available, use it')."""
    from udamon.cli.demo import live_primitive

    ok = {n: entry(n).available()[0] for n in ("rwp", "hint", "wp")}
    want = ("rwp" if ok["rwp"] else "hint,wp" if ok["hint"] and ok["wp"]
            else "hint" if ok["hint"] else None)
    assert live_primitive()[0] == want


@pytest.mark.skipif(not _hint_ok, reason=f"hint unavailable: {_hint_why}")
def test_live_demo_prints_runnable_commands_and_explains_its_units(tmp_path):
    p = run_udamon("demo", "--live", "--dir", str(tmp_path), check=True, timeout=120)
    start = next(ln for ln in p.stdout.splitlines() if "udamon.workloads.pinned" in ln)
    assert start.startswith(f"$ {sys.executable} -m udamon.workloads.pinned"), start
    assert "These are hits, not reports" in p.stdout
    from udamon.cli.demo import live_primitive

    prim = live_primitive()[0]
    assert f"--primitive {prim} " in p.stdout
    rows, verdicts = {}, {}
    for ln in p.stdout.splitlines():
        parts = ln.split()
        if len(parts) >= 5 and parts[0] in ("R", "W", "S", "I") and parts[1].isdigit():
            rows[parts[0]] = [int(x) for x in parts[1:5]]  # cpu:0 cpu:1 read write
        if ln.startswith("  ") and ln[2:4] in ("R:", "W:", "S:", "I:"):
            verdicts[ln[2]] = ln[5:]
    assert set(rows) == set(verdicts) == set("RWSI"), p.stdout
    for k, (_c0, _c1, r, w) in rows.items():  # a verdict never claims what is not there
        if "as the workload does" in verdicts[k]:
            assert (r > 0) == (k in "RS") and (w > 0) == (k in "WS"), (k, rows[k])
        if k == "S" and (r == 0 or w == 0):
            assert "seen" in verdicts[k], verdicts[k]
    if prim == "hint,wp":  # wp samples the writer's buffers every 5 ms for 5 s
        assert rows["W"][3] > 0 and rows["S"][3] > 0 and rows["R"][3] == 0, rows


# -- 9. a state file left by a SIGKILL in the middle of writing it -----------------------

STAT_INTERVAL = "/proc/sys/vm/stat_interval"


def _child(state_dir: Path, value: str, watchdog: bool) -> subprocess.Popen:
    """A session that changes a scratch setting twice; the second state-file write is
    held between writing the .tmp file and renaming it (where a SIGKILL left it)."""
    src = str(Path(udamon.__file__).resolve().parents[1])
    code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {src!r})
        from udamon.system.sysctl_guard import SettingsGuard
        g = SettingsGuard(state_dir={str(state_dir)!r}, watchdog={watchdog})
        g.set({STAT_INTERVAL!r}, {value!r})
        real = os.replace
        def held(a, b):
            if ".tmp" in str(a):
                print("held", flush=True)
                time.sleep(600)
            real(a, b)
        os.replace = held
        g.set({STAT_INTERVAL!r}, str(int({value!r}) + 1))
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(not ROOT, reason="changing a sysctl needs root")
@pytest.mark.parametrize("watchdog", [True, False])
def test_no_tmp_state_file_is_left_by_a_sigkill_mid_write(tmp_path, watchdog):
    from udamon.system.sysctl_guard import restore_stale

    with open(STAT_INTERVAL) as f:
        orig = f.read().strip()
    try:
        proc = _child(tmp_path, str(int(orig) + 1), watchdog)
        assert proc.stdout.readline().strip() == "held"
        assert list(tmp_path.glob("settings-*.json.tmp*"))  # the moment of the report
        proc.kill()
        proc.wait(10)
        if not watchdog:  # as if the watchdog died too: the next session cleans up
            restore_stale(str(tmp_path))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list(tmp_path.glob("settings-*")):
            time.sleep(0.05)
        assert list(tmp_path.glob("settings-*")) == []
        with open(STAT_INTERVAL) as f:
            assert f.read().strip() == orig
    finally:
        with open(STAT_INTERVAL) as f:
            if f.read().strip() != orig:
                with open(STAT_INTERVAL, "w") as w:
                    w.write(orig)
