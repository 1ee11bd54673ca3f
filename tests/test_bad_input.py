"""Bad input and bad options found by an audit: each is one line on stderr and exit 2
(never a hang, a traceback or an internal error), and nothing is lost or destroyed."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_udamon

HEADER = "time_ns,pid,tid,cpu,addr,size,write\n"


def csv(tmp_path, body: str, name: str = "in.csv"):
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def one_line_error(p, code: int = 2) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    return lines[0]


def end_line(path) -> dict:
    return json.loads(path.read_text().splitlines()[-1])["end"]


def test_time_jump_is_refused_not_a_hang(tmp_path):
    """A time_ns in the wrong unit (or garbage) would close ~10^10 empty intervals."""
    src = csv(tmp_path, "1000,1,1,0,4096,8,1\n1000000000000000000,1,1,0,8192,8,1\n")
    out = tmp_path / "g.jsonl"
    p = run_udamon("record", "--input", str(src), "-o", str(out), timeout=30)
    msg = one_line_error(p)
    assert f"{src}:3: time jumps from 1000 to 1000000000000000000 ns" in msg
    assert "aggregation intervals without a report" in msg and "nanoseconds" in msg
    assert end_line(out)["reason"] == "error"


def test_replay_catch_up_honours_sigterm(tmp_path):
    """1 s of input at 1 us aggregations is 10^6 intervals: SIGTERM ends it cleanly, and
    the snapshots closed so far are in the record already."""
    rows = "".join(f"{i * 1_000_000},1,1,0,{4096 * (1 + i % 50)},8,1\n" for i in range(1001))
    src = csv(tmp_path, rows)
    out = tmp_path / "long.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--input", str(src),
                             "--sample", "1us", "--aggr", "1us", "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until snapshots are being written
            if out.exists() and len(out.read_bytes().splitlines()) > 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("no snapshot written within 30 s")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    end = end_line(out)
    assert end["reason"] == "interrupted"
    assert 0 < end["snapshots"] < 1_000_000


def test_output_that_is_the_input_is_refused(tmp_path):
    src = csv(tmp_path, "1000,1,1,0,4096,8,1\n", name="a.csv")
    before = src.read_text()
    (tmp_path / "link.csv").symlink_to(src)
    for out in (src, tmp_path / "link.csv"):
        msg = one_line_error(run_udamon("record", "--input", str(src), "-o", str(out)))
        assert "is the --input file" in msg
        assert src.read_text() == before


OK_ROWS = "1000,1,1,0,4096,8,1\n200000000,1,1,0,8192,8,0\n"


@pytest.mark.parametrize("args,msg", [
    (["--sample", "0ms"], "must be positive"),
    (["--sample", "0us"], "must be positive"),
    (["--aggr", "0s"], "must be positive"),
    (["--update", "0.0ms"], "must be positive"),
    (["--cpus", "99999999999999999999"], "bad CPU 99999999999999999999"),
    (["--tids", "3000000000"], "bad thread id 3000000000"),
    (["--filter", "nodes:3000000000"], "bad node"),
    (["--probe", "p=pids:99999999999999999999"], "bad process id"),
    (["--pid", "99999999999999999999"], "not a process id"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--cpus", ""], "--cpus needs at least one CPU"),
    (["--tids", " "], "--tids needs at least one thread id"),
    (["--cpus", "", "--tids", ""], "--cpus needs at least one CPU"),
])
def test_bad_options_are_exit_2(tmp_path, args, msg):
    src = csv(tmp_path, OK_ROWS)
    p = run_udamon("record", "--input", str(src), "-o", str(tmp_path / "x.jsonl"), *args)
    assert msg in one_line_error(p)


@pytest.mark.parametrize("addr,size,what", [
    ("0xfffffffffffff000", "8", "field 'addr'"),
    ("18446744073709551615", "8", "field 'addr'"),
    ("0xffffffffffffeff9", "8", "ends above"),
    ("4096", "18446744073709551615", "field 'size'"),
])
def test_addresses_in_the_last_page_are_bad_input(tmp_path, addr, size, what):
    src = csv(tmp_path, f"1000,1,1,0,4096,8,1\n2000,1,1,0,{addr},{size},1\n")
    msg = one_line_error(run_udamon("record", "--input", str(src), "-o",
                                    str(tmp_path / "x.jsonl")))
    assert msg.startswith(f"udamon: error: {src}:3: ") and what in msg


def test_the_highest_usable_page_is_fine(tmp_path):
    src = csv(tmp_path, "1000,1,1,0,0xffffffffffffe000,4096,1\n")
    run_udamon("record", "--input", str(src), "-q", "-o", str(tmp_path / "x.jsonl"),
               check=True)
