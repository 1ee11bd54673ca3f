"""Property-based fuzzing of every parser udamon exposes to input (issue 15, the
reliability campaign): durations and sizes, FILTERS and probe syntax, the replay CSV,
perf-script import, the report channel's binary and CSV framing, and the record
reader with every report kind on what it reads.

The property is the project's contract for bad input: a parser returns a value or
raises its one error type (ValueError for option values, InputError/UsageError for
files), and the CLI answers 0 or 2 with one line on stderr -- never an internal error.
Where there is ground truth the test checks values too (round trips of filters and
wire records, exact durations).

The normal suite runs a few hundred inputs per parser with a fixed seed; ``pytest
--soak`` (bench/bench_campaign.py) runs >= 10,000 per parser (over its tests) with
fresh random inputs.
``UDAMON_FUZZ_STATS=FILE`` writes the number of inputs each test tried.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import socket
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from udamon.errors import InputError, UsageError
from udamon.intake import wire
from udamon.intake.channel import ChannelServer
from udamon.intake.csv_format import OPTIONAL, REQUIRED, parse_header, parse_rows
from udamon.intake.reports import REPORT_DTYPE
from udamon.probes.breakdown import parse_kinds
from udamon.probes.filters import conditions_text, evaluate, parse_conditions
from udamon.probes.probe import Probe
from udamon.record.reader import read_record

SOAK = bool(os.environ.get("UDAMON_SOAK"))
TRIED: Counter = Counter()


def fuzz(normal: int, soak: int = 10_000):
    """Hypothesis settings: ``normal`` inputs in the suite (fixed seed), ``soak`` with
    --soak (random)."""
    n = soak if SOAK else normal
    cap = os.environ.get("UDAMON_FUZZ_MAX")  # a quicker random pass: UDAMON_SOAK=1 and a cap
    n = min(n, int(cap)) if cap else n
    return settings(max_examples=n, deadline=None,
                    derandomize=not SOAK, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def _stats(request):
    yield
    path = os.environ.get("UDAMON_FUZZ_STATS")
    if path:
        old = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
        failed = " (runs with failures)" if request.session.testsfailed else ""
        for k, v in TRIED.items():  # added up: one parser's tests may run apart
            old[k + failed] = old.get(k + failed, 0) + v
        Path(path).write_text(json.dumps(old, indent=1, sort_keys=True))


def cli(*argv: str) -> tuple[int, str]:
    """Run the udamon CLI in this process (as ``udamon ARGV`` would); (exit, stderr)."""
    from udamon.cli.main import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(list(argv))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return rc, err.getvalue()


def check_cli(rc: int, err: str) -> None:
    """The contract: 0, or 2 with one clear line; never an internal error (1 is a
    runtime failure, which bad input must not be)."""
    assert "internal error" not in err and "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = [ln for ln in err.splitlines() if not ln.startswith("udamon: warning")]
        assert len(lines) == 1, err


# -- text that looks like what people type --------------------------------------------

NUM = st.one_of(st.integers(-10, 10**6).map(str), st.integers().map(str),
                st.from_regex(r"\A[0-9]{0,45}(\.[0-9]{0,12})?\Z"),
                st.sampled_from(["", ".", "0x10", "1e3", "inf", "nan", "٣", "1_000", "-0", "+1",
                                 "9" * 50]))
UNIT = st.sampled_from(["", "ns", "us", "µs", "ms", "s", "m", "min", "h", "d", "S", "MS", "b",
                        "k", "KiB", "mb", "MiB", "G", "gib", "t", "TiB", "PiB", "x", "1s"])
JUNK = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
VALUE_TEXT = st.one_of(
    st.builds(lambda sp1, n, sp2, u, sp3: sp1 + n + sp2 + u + sp3,
              st.sampled_from(["", " ", "\t", "-", " -"]), NUM, st.sampled_from(["", " "]),
              UNIT, st.sampled_from(["", " ", "\n"])),
    JUNK)


def _option_parsers():
    from udamon.cli import common, migrate
    from udamon.cli.live import _scan_period_ms, _scan_size_mb
    from udamon.units import (
        parse_duration_ns,
        parse_duration_us,
        parse_int,
        parse_positive_duration_us,
        parse_range,
        parse_size,
    )

    return {"duration_ns": parse_duration_ns, "duration_us": parse_duration_us,
            "positive_duration_us": parse_positive_duration_us, "size": parse_size,
            "int": parse_int, "range": parse_range, "--duration": common.duration_arg,
            "--seed": common._seed, "--regions": common._parse_minmax,
            "--intervals-goal": common._parse_goal, "--pid": common.pid_list,
            "--hint-scan-period": _scan_period_ms, "--hint-scan-size": _scan_size_mb,
            "--quota": migrate._quota, "--min-share": migrate._share,
            "--min-hits": migrate._positive_int}


OPTION_PARSERS = _option_parsers()


@fuzz(400)
@given(name=st.sampled_from(sorted(OPTION_PARSERS)), text=st.one_of(
    VALUE_TEXT,
    st.builds(lambda a, b: f"{a}-{b}", VALUE_TEXT, VALUE_TEXT),
    st.builds(lambda *p: ",".join(p), VALUE_TEXT, VALUE_TEXT, VALUE_TEXT, VALUE_TEXT)))
def test_option_values_parse_or_say_why(name, text):
    """Every option value parser returns a value or a ValueError with a message (what
    argparse turns into one line); an OverflowError or TypeError would be a traceback."""
    TRIED["option values (durations, sizes, ranges, ids)"] += 1
    try:
        v = OPTION_PARSERS[name](text)
    except ValueError as e:
        assert str(e)
        return
    if name.startswith(("duration", "positive", "--duration")):
        assert 0 <= v < 1 << 63
    if name == "size":
        assert 0 <= v < 1 << 64


@fuzz(300)
@given(whole=st.integers(0, 10**12), frac=st.from_regex(r"\A[0-9]{0,9}\Z"),
       unit=st.sampled_from(["ns", "us", "ms", "s", "m", "h"]))
def test_durations_are_exact(whole, frac, unit):
    """Ground truth: the nanoseconds of 'W.Fu' are W.F times the unit, rounded to the
    nearest (a float would lose the last digits of long ones)."""
    from fractions import Fraction

    from udamon.units import _DUR, parse_duration_ns

    TRIED["option values (durations, sizes, ranges, ids)"] += 1
    text = f"{whole}.{frac}{unit}" if frac else f"{whole}{unit}"
    want = Fraction(f"{whole}.{frac or 0}") * _DUR[unit]
    if want >= 1 << 63:
        with pytest.raises(ValueError):
            parse_duration_ns(text)
        return
    got = parse_duration_ns(text)
    assert abs(got - want) <= Fraction(1, 2)


# -- FILTERS and probes ---------------------------------------------------------------

TYPES = ["cpus", "nodes", "threads", "pids", "write", "read", "addr", "local", "remote",
         "page_nodes", "source", "mem", "bogus", "", "cpu"]
VALUES = st.one_of(
    st.from_regex(r"\A[0-9]{1,4}(-[0-9]{1,4})?(\+[0-9]{1,4}(-[0-9]{1,4})?){0,3}\Z"),
    st.builds(lambda a, b: f"{a:#x}-{b:#x}", st.integers(0, 2**65), st.integers(0, 2**65)),
    st.sampled_from(["hint", "wp", "rwp", "replay", "pmu", "external", "perf", "nope",
                     "cache", "ram", "remote-ram", "remote-cache", "other", "local", "remote",
                     "-1", "4-2", "0-99999999", "2147483648", "", " ", "1,2", "a"]),
    JUNK)
COND = st.builds(lambda neg, t, colon, v: f"{neg}{t}{colon}{v}",
                 st.sampled_from(["", "!", " ! ", "!!"]), st.sampled_from(TYPES),
                 st.sampled_from([":", ":", "", " : "]), VALUES)
FILTERS_TEXT = st.one_of(st.lists(COND, min_size=0, max_size=5).map(",".join), JUNK)


def _reports(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = np.zeros(n, dtype=REPORT_DTYPE)
    r["cpu"] = rng.integers(-1, 8, n)
    r["node"] = rng.integers(-1, 3, n)
    r["page_node"] = rng.integers(-1, 3, n)
    r["tid"] = rng.integers(-1, 50, n)
    r["pid"] = rng.integers(0, 50, n)
    r["addr"] = rng.integers(0, 1 << 48, n, dtype=np.uint64)
    r["size"] = 8
    r["write"] = rng.random(n) < 0.5
    r["source"] = rng.integers(0, 4, n)
    return r


@fuzz(600)
@given(text=FILTERS_TEXT, seed=st.integers(0, 2**16))
def test_filters_parse_evaluate_and_round_trip(text, seed):
    """parse_conditions takes any text to filters or a ValueError; what it takes
    evaluates on reports and its conditions_text parses back to the same filters."""
    TRIED["FILTERS and probe syntax"] += 1
    try:
        filters = parse_conditions(text)
        mask = evaluate(filters, _reports(64, seed))
    except ValueError as e:
        assert str(e)
        return
    assert mask.dtype == bool and mask.size == 64
    again = parse_conditions(conditions_text(filters))
    assert [f.to_dict() for f in again] == [f.to_dict() for f in filters]


@fuzz(400)
@given(name=st.one_of(st.sampled_from(["w", "cpu:0", "write", "p q", "", "=", "x" * 80]), JUNK),
       sep=st.sampled_from(["=", "", "==", " = "]), text=FILTERS_TEXT,
       kinds=st.lists(st.one_of(st.sampled_from(["cpu", "node", "thread", "rw", "numa", "",
                                                 "cpu,rw", "bogus", "CPU"]), JUNK), max_size=3))
def test_probes_and_breakdowns_parse_or_say_why(name, sep, text, kinds):
    TRIED["FILTERS and probe syntax"] += 1
    try:
        p = Probe.parse(f"{name}{sep}{text}")
        evaluate(p.filters, _reports(16, 1))
    except ValueError as e:
        assert str(e)
    try:
        parse_kinds(kinds)
    except ValueError as e:
        assert str(e)


@fuzz(60, 1_000)
@given(text=FILTERS_TEXT, probe=FILTERS_TEXT, cpus=st.one_of(st.none(), VALUES))
def test_filter_options_through_the_cli(tmp_path, text, probe, cpus):
    """The same text as record options, against a replay input: 0 or one line, exit 2."""
    TRIED["FILTERS and probe syntax"] += 1
    src = _demo_csv(tmp_path)
    argv = ["record", "--input", str(src), "-q", "-o", str(tmp_path / "f.jsonl"),
            "--filter", text, "--probe", f"p={probe}"]
    if cpus is not None:
        argv += ["--cpus", cpus]
    check_cli(*cli(*argv))


def _demo_csv(tmp_path: Path) -> Path:
    path = tmp_path / "demo.csv"
    if not path.exists():
        rows = [f"{i * 2_000_000},7,{7 + i % 3},{i % 4},{0x100000 + 4096 * (i % 97)},8,{i % 2}"
                for i in range(400)]
        path.write_text(",".join(REQUIRED) + "\n" + "\n".join(rows) + "\n")
    return path


# -- the replay CSV ---------------------------------------------------------------------

INT_FIELD = st.one_of(
    st.integers(-2, 300).map(str), st.integers(0, 2**40).map(str),
    st.sampled_from(["-1", "0", "1", "2147483647", "2147483648", "-2147483649",
                     "9223372036854775807", "9223372036854775808", "-9223372036854775808",
                     "18446744073709547520", "18446744073709551615", "18446744073709551616",
                     "0x7f0000000000", "0xFFFFFFFFFFFFF000", "0x", "1.5", "", " ", "x", "1e3",
                     "٣", "1_0", "+5", "0b101", "nan", " 7 ", "\"1\"", "#3"]),
    JUNK)
SOURCE_FIELD = st.one_of(st.sampled_from(["hint", "wp", "replay", "external", "perf", "pmu",
                                          "rwp", "x", "", " hint "]), JUNK)


@st.composite
def csv_inputs(draw):
    cols = list(draw(st.permutations(REQUIRED)))
    cols += draw(st.lists(st.sampled_from(OPTIONAL), unique=True, max_size=4))
    if draw(st.integers(0, 20)) == 0:
        cols.append(draw(st.sampled_from(["bogus", "time_ns", "", "ADDR"])))
    if draw(st.booleans()):
        cols = draw(st.permutations(cols))
    header = ",".join(f'"{c}"' if draw(st.integers(0, 10)) == 0 else c for c in cols)
    nrows = draw(st.integers(0, 40))
    t = draw(st.integers(-10**9, 10**10))
    lines = []
    for _ in range(nrows):
        kind = draw(st.integers(0, 30))
        if kind == 0:
            lines.append(draw(st.sampled_from(["", "# comment", "  #x", ",,,,,,", "\r"])))
            continue
        if kind == 1:
            lines.append(draw(JUNK))
            continue
        fields = []
        for c in cols:
            good = draw(st.integers(0, 8)) != 0
            if c == "time_ns":
                t += draw(st.integers(0, 10**8)) if draw(st.integers(0, 10)) else \
                    draw(st.integers(-10**9, 10**10))
                fields.append(str(t) if good else draw(INT_FIELD))
            elif c == "addr":
                a = draw(st.integers(0, 2**20)) * 4096 + draw(st.integers(0, 4095))
                fields.append((hex(a) if draw(st.booleans()) else str(a)) if good
                              else draw(INT_FIELD))
            elif c == "size":
                fields.append(str(draw(st.integers(1, 8192))) if good else draw(INT_FIELD))
            elif c == "write":
                fields.append(str(draw(st.integers(0, 1))) if good else draw(INT_FIELD))
            elif c == "source":
                fields.append(draw(SOURCE_FIELD))
            elif c == "mem":
                fields.append(str(draw(st.integers(0, 5))) if good else draw(INT_FIELD))
            elif c == "pid":
                fields.append(str(draw(st.integers(1, 3))) if good else draw(INT_FIELD))
            else:
                fields.append(str(draw(st.integers(-1, 3))) if good else draw(INT_FIELD))
        if draw(st.integers(0, 25)) == 0:
            fields = fields[:-1] if draw(st.booleans()) else [*fields, "0"]
        lines.append(",".join(fields))
    eol = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    text = header + eol + eol.join(lines) + (eol if draw(st.integers(0, 5)) else "")
    if draw(st.integers(0, 15)) == 0:
        text = "# produced by a test\n" + text
    return text


def _write(path: Path, text: str, zipped: bool, raw: bytes | None = None) -> None:
    data = raw if raw is not None else text.encode("utf-8", "surrogatepass")
    path.write_bytes(gzip.compress(data) if zipped else data)


@fuzz(100, 6_000)
@given(text=csv_inputs(), zipped=st.integers(0, 6).map(lambda x: x == 0),
       breakdown=st.sampled_from([None, "cpu,rw", "node,thread", "numa"]),
       cut=st.one_of(st.none(), st.integers(0, 2000)))
def test_replay_csv_records_or_names_the_line(tmp_path, text, zipped, breakdown, cut):
    TRIED["replay CSV"] += 1
    src = tmp_path / ("in.csv.gz" if zipped else "in.csv")
    raw = text.encode("utf-8", "surrogatepass")
    if cut is not None:
        raw = raw[:cut]
    _write(src, text, zipped, raw)
    argv = ["record", "--input", str(src), "-q", "-o", str(tmp_path / "r.jsonl"), "--seed", "1"]
    if breakdown:
        argv += ["--breakdown", breakdown]
    rc, err = cli(*argv)
    check_cli(rc, err)
    if rc == 0:
        rec = read_record(str(tmp_path / "r.jsonl"))
        assert rec.complete


@fuzz(120, 5_000)
@given(data=st.binary(max_size=600))
def test_replay_csv_random_bytes(tmp_path, data):
    TRIED["replay CSV"] += 1
    src = tmp_path / "b.csv"
    src.write_bytes(",".join(REQUIRED).encode() + b"\n" + data if data[:1] != b"\x1f" else data)
    check_cli(*cli("record", "--input", str(src), "-q", "-o", str(tmp_path / "b.jsonl")))


# -- perf script import -------------------------------------------------------------------

EVENTS = ["page-faults", "cpu/mem-loads,ldlat=30/P", "cpu/mem-stores/P", "ibs_op//", "memory",
          "exceptions:page_fault_user", "cycles", "major-faults", "x"]
DSRC = ["|OP LOAD|LVL L1 hit|SNP None|TLB L1 or L2 hit|LCK No|BLK  N/A",
        "|OP STORE|LVL L1 hit|SNP N/A|TLB N/A|LCK N/A|BLK  N/A",
        "|OP LOAD|LVL Remote RAM (1 hop) hit|SNP N/A|TLB N/A|LCK N/A|BLK  N/A",
        "|OP N/A|LVL N/A|SNP N/A|TLB N/A|LCK N/A|BLK  N/A", "|OP LOAD|", ""]


@st.composite
def perf_lines(draw):
    out = []
    t = draw(st.integers(0, 10**6))
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.integers(0, 12))
        if kind == 0:
            out.append(draw(st.sampled_from(["", "# ========", "# captured on: x", "junk"])))
            continue
        if kind == 1:
            out.append(draw(JUNK))
            continue
        comm = draw(st.sampled_from(["app", "my app", "", "a/b", "[x]", "1/2"]))
        pid = draw(st.one_of(st.integers(1, 3), st.integers(-2, 2**33)))
        tid = draw(st.one_of(st.integers(1, 5), st.integers(-2, 2**33)))
        cpu = draw(st.one_of(st.integers(0, 4), st.integers(0, 2**40)))
        t += draw(st.integers(0, 10**8))
        sec, ns = divmod(t, 10**9)
        frac = f"{ns:09d}" if draw(st.integers(0, 5)) else f"{ns // 1000:06d}"
        period = draw(st.sampled_from(["", "1 ", "100 "]))
        ev = draw(st.sampled_from(EVENTS))
        addr = draw(st.one_of(st.integers(0, 2**47), st.integers(0, 2**64 + 5),
                              st.sampled_from([0, 2**63, 2**64 - 4096, 2**64 - 1])))
        rest_kind = draw(st.integers(0, 3))
        if rest_kind == 0:
            rest = f"{addr:16x}"
        elif rest_kind == 1:
            ec = draw(st.integers(0, 2**20))
            rest = f"address={addr:#x} ip=0x401000 error_code={ec:#x}"
        elif rest_kind == 2:
            ds = draw(st.integers(0, 2**64 - 1))
            w = draw(st.one_of(st.just(""), st.integers(0, 2**40).map(str)))
            rest = f"{addr:16x} {ds:16x} {draw(st.sampled_from(DSRC))} {w}"
        else:
            rest = draw(JUNK)
        out.append(f"{comm} {pid}/{tid} [{cpu:03d}] {sec}.{frac}: {period}{ev}: {rest}")
    return "\n".join(out) + ("\n" if draw(st.integers(0, 4)) else "")


@fuzz(80, 6_000)
@given(text=perf_lines(), zipped=st.integers(0, 8).map(lambda x: x == 0))
@example(text="app 1/1 [2147483648] 0.000000: page-faults:  0\n", zipped=False)  # found
def test_perf_script_import_records_or_names_the_line(tmp_path, text, zipped):
    TRIED["perf-script import"] += 1
    src = tmp_path / "p.txt"
    _write(src, text, zipped)
    argv = ["record", "--input", str(src), "--input-format", "perf-script", "-q", "-o",
            str(tmp_path / "p.jsonl"), "--breakdown", "cpu,rw"]
    check_cli(*cli(*argv))


@fuzz(150, 5_000)
@given(data=st.binary(max_size=400))
def test_perf_script_random_bytes(tmp_path, data):
    TRIED["perf-script import"] += 1
    src = tmp_path / "pb.txt"
    src.write_bytes(data)
    check_cli(*cli("record", "--input", str(src), "--input-format", "perf-script", "-q",
                   "-o", str(tmp_path / "pb.jsonl")))


# -- the report channel -----------------------------------------------------------------

WIRE_FIELD = {
    "version": st.one_of(st.just(wire.VERSION), st.integers(0, 255)),
    "kind": st.one_of(st.just(wire.KIND_REPORT), st.integers(0, 255)),
    "write": st.integers(0, 255), "source": st.integers(0, 255), "mem": st.integers(0, 255),
    "time_ns": st.integers(-2**63, 2**63 - 1), "addr": st.integers(0, 2**64 - 1),
    "size": st.one_of(st.integers(0, 8192), st.integers(0, 2**64 - 1)),
    "pid": st.integers(-2**31, 2**31 - 1), "tid": st.integers(-2**31, 2**31 - 1),
    "cpu": st.integers(-2**31, 2**31 - 1), "node": st.integers(-2**31, 2**31 - 1)}


@fuzz(250)
@given(recs=st.lists(st.fixed_dictionaries(WIRE_FIELD), max_size=20),
       tail=st.binary(max_size=47))
def test_wire_records_decode_to_valid_reports(recs, tail):
    """Any bytes decode without raising; what comes out obeys the report contract, every
    record is a report, a refused one or a notice, and a version slip stops the rest."""
    TRIED["report channel (wire, CSV)"] += 1
    w = np.zeros(len(recs), dtype=wire.WIRE_DTYPE)
    for i, r in enumerate(recs):
        for k, v in r.items():
            w[k][i] = v
    d = wire.decode(w.tobytes() + tail)
    r = d.reports
    assert r.dtype == REPORT_DTYPE
    if r.size:
        assert (r["size"] >= 1).all() and (r["addr"] < np.uint64(wire.ADDR_END)).all()
        assert (r["size"] <= np.uint64(wire.ADDR_END) - r["addr"]).all()
        assert (r["pid"] >= 0).all() and (r["tid"] >= -1).all() and (r["cpu"] >= -1).all()
    upto = d.out_of_step if d.out_of_step is not None else len(recs)
    reports = sum(1 for x in recs[:upto] if x["kind"] == wire.KIND_REPORT)
    assert r.size + d.bad - sum(1 for x in recs[:upto] if x["kind"] > wire.KIND_DROPS) \
        == reports


@fuzz(300)
@given(n=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_wire_round_trip_of_valid_reports(n, seed):
    TRIED["report channel (wire, CSV)"] += 1
    rep = _reports(n, seed)
    rep["time_ns"] = np.arange(n) * 1000 + 1
    rep["page_node"] = -1
    d = wire.decode(wire.encode(rep))
    assert d.bad == 0 and d.out_of_step is None
    for k in ("time_ns", "pid", "tid", "cpu", "node", "addr", "size", "write", "mem"):
        assert (d.reports[k] == rep[k]).all(), k


@fuzz(300)
@given(data=st.binary(min_size=0, max_size=80))
def test_wire_hello_and_reply_parse_or_refuse(data):
    TRIED["report channel (wire, CSV)"] += 1
    try:
        version, size, name = wire.parse_hello(data)
        assert isinstance(name, str)
    except wire.WireError as e:
        assert str(e)
    ok, why = wire.parse_reply(data)
    assert ok or why


@fuzz(120)
@given(text=csv_inputs())
def test_channel_csv_lines_parse_or_name_the_line(text):
    """The CSV framing's parsers directly: header then rows, InputError naming a line."""
    TRIED["report channel (wire, CSV)"] += 1
    head, _, body = text.partition("\n")
    try:
        cols = parse_header(head, "stdin:1")
        rows = [ln for ln in body.split("\n") if ln.strip() and not ln.strip().startswith("#")]
        if rows:
            r = parse_rows("stdin", rows, list(range(2, 2 + len(rows))), cols, len(cols))
            assert r.size == len(rows)
    except InputError as e:
        assert str(e).startswith("stdin:")


def _serve(tmp_path: Path, data: bytes, stdin: bool) -> ChannelServer:
    """A channel with one producer that sent ``data`` and closed (stdin: a file)."""
    if stdin:
        f = tmp_path / "stdin.bin"
        f.write_bytes(data)
        fd = os.open(f, os.O_RDONLY)
        srv = ChannelServer(stdin_fd=fd, clock=lambda: 10**18)
        return srv
    path = str(tmp_path / "s.sock")
    srv = ChannelServer(path, clock=lambda: 10**18)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.sendall(data)
    c.close()
    return srv


@fuzz(100, 5_000)
@given(head=st.sampled_from([b"", wire.encode_hello("fuzz"), wire.encode_hello("x", 2),
                             (",".join(REQUIRED) + "\n").encode(), b"UDAMONRP", b"time_ns\n"]),
       body=st.one_of(st.binary(max_size=500), csv_inputs().map(
           lambda t: t.encode("utf-8", "surrogatepass"))),
       stdin=st.booleans())
def test_channel_takes_any_stream(tmp_path, head, body, stdin):
    """A live session's channel fed any bytes: a socket producer is disconnected with a
    reason, stdin's bad line is an InputError (exit 2) -- never another exception."""
    TRIED["report channel (wire, CSV)"] += 1
    srv = _serve(tmp_path, head + body, stdin)
    try:
        for _ in range(50):
            try:
                srv.read()
            except InputError as e:
                assert stdin and str(e).startswith("stdin")
                return
            if stdin and srv.stdin_done:
                break
            if not stdin and srv.producers and not any(p.connected for p in srv.producers):
                break
            srv.wait(0.01)
        for p in srv.producers:
            d = p.to_dict()
            assert d["reports"] >= 0 and d["bad"] >= 0
    finally:
        srv.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp_path / "s.sock")


# -- the record reader and every report ----------------------------------------------------

_BASES: dict[str, list[str]] = {}


def _base_records(tmp: Path) -> dict[str, list[str]]:
    """A few real records (replay: probes, page nodes, written pages; a wp-like one with
    mapped and mergeable spans) as lists of lines, made once."""
    if _BASES:
        return _BASES
    rows = []
    for i in range(1500):
        cpu = i % 4
        rows.append(f"{i * 1_000_000},7,{100 + cpu},{cpu},{cpu // 2},"
                    f"{0x7f0000000000 + 4096 * ((i * 7) % 300)},64,{i % 3 == 0:d},{(i // 5) % 2}")
    src = tmp / "base.csv"
    src.write_text("time_ns,pid,tid,cpu,node,addr,size,write,page_node\n" + "\n".join(rows) + "\n")
    for name, extra in (("plain", []), ("rw", ["--breakdown", "cpu,thread,rw,numa"]),
                        ("wo", ["--write-only", "--probe", "c0=cpus:0"])):
        out = tmp / f"{name}.jsonl"
        rc, err = cli("record", "--input", str(src), "-q", "-o", str(out), "--seed", "2", *extra)
        assert rc == 0, err
        _BASES[name] = out.read_text().splitlines()
    # as a live wp record would be: primitive wp, coverage controlled, mapped spans
    lines = [json.loads(x) for x in _BASES["rw"]]
    lines[0]["primitive"], lines[0]["coverage"] = "wp", "controlled"
    for o in lines[1:-1]:
        lo, hi = o["regions"][0]["start"], o["regions"][-1]["end"]
        o["mapped"] = [[lo, (lo + hi) // 2 & ~4095], [(lo + hi) // 2 & ~4095 | 4096, hi]]
        o["mergeable"] = [[lo, lo + 8192]]
    _BASES["live"] = [json.dumps(o) for o in lines]
    return _BASES


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65),
                      st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 2**64 - 1]),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON = st.recursive(JSON_LEAF, lambda c: st.one_of(
    st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)), max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield from _paths(v, (*prefix, i))


def _mutate_json(draw, obj):
    paths = list(_paths(obj))
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["set", "set", "delete", "add"]))
    if not path:
        return draw(JSON) if op == "set" else obj
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == "set":
        parent[key] = draw(JSON)
    elif op == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[draw(st.sampled_from(["mapped", "mergeable", "numa", "nodes", "x", "end",
                                     "written_pages", "probes"]))] = draw(JSON)
    else:
        parent.insert(key, draw(JSON))
    return obj


@st.composite
def mutated_records(draw):
    base = draw(st.sampled_from(["plain", "rw", "wo", "live"]))
    lines = list(_BASES[base])
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        op = draw(st.integers(0, 9))
        i = draw(st.integers(0, len(lines) - 1))
        if op <= 4:
            try:
                obj = json.loads(lines[i])
            except ValueError:
                continue  # a line an earlier step made junk
            lines[i] = json.dumps(_mutate_json(draw, obj))
        elif op == 5:
            del lines[i]
        elif op == 6:
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
        elif op == 7:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 8:
            lines[i] = draw(JUNK)
        else:
            lines = lines[:i + 1]
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 6)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 8)) == 0:
        data = gzip.compress(data)
        if draw(st.booleans()):
            data = data[:draw(st.integers(0, len(data)))]
    return base, data


KINDS = [["access"], ["access", "--snapshot", "sum"], ["access", "--snapshot", "all", "--top",
         "3"], ["heatmap"], ["wss"], ["numa"], ["ksm"], ["dirty"], ["sharing"],
         ["access", "--format", "json"], ["numa", "--format", "json"], ["ksm", "--format",
                                                                       "json"]]


@fuzz(150, 6_000)
@given(rec=mutated_records(), kind=st.sampled_from(KINDS), salvage=st.booleans())
def test_records_read_or_name_the_line_and_every_report_answers(tmp_path, rec, kind,
                                                                  salvage):
    """A damaged record is an InputError naming FILE:LINE (or read up to the damage with
    --salvage); whatever reads, every report kind answers it with 0 or one line."""
    TRIED["record reader and reports"] += 1
    _base_records(tmp_path)
    _, data = rec
    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    try:
        r = read_record(str(path), salvage=salvage)
    except (InputError, UsageError) as e:
        assert str(e)
        return
    assume(r is not None)
    argv = ["report", *kind, "-i", str(path)] + (["--salvage"] if salvage else [])
    check_cli(*cli(*argv))


@pytest.fixture(autouse=True, scope="module")
def _bases(tmp_path_factory):
    _base_records(tmp_path_factory.mktemp("bases"))


@fuzz(200, 5_000)
@given(data=st.binary(max_size=400), gz=st.booleans())
def test_record_random_bytes(tmp_path, data, gz):
    TRIED["record reader and reports"] += 1
    path = tmp_path / "x.jsonl"
    path.write_bytes(gzip.compress(data) if gz else data)
    for salvage in (False, True):
        try:
            read_record(str(path), salvage=salvage)
        except InputError as e:
            assert str(e)


# -- damo's record files (record/damo_import.py, read by every report) ---------------------


def _damo_snap(t: int, regions: list[tuple[int, int, int, int]]) -> dict:
    return {"start_time": str(t - 100_000_000), "end_time": str(t),
            "regions": [{"start": str(a), "end": str(b),
                         "nr_accesses": {"samples": n, "percent": None},
                         "age": {"usec": None, "aggr_intervals": str(g)},
                         "probe_hits": [n, 0], "sz_filter_passed": "0"}
                        for a, b, n, g in regions],
            "total_bytes": None, "damos_stats": None, "sample_interval_us": None}


DAMO_BASE = [{"kdamond_idx": 0, "context_idx": 0, "scheme_idx": None, "target_id": 4321,
              "intervals": {"sample_us": 5000, "aggr_us": 100000, "ops_update_us": 1000000},
              "scheme_filters": [], "data_source": "unknown",
              "snapshots": [_damo_snap(t * 10**8, [(4096, 8192, k, 1), (8192, 65536, 0, t)])
                            for t, k in ((1, 4), (2, 7), (3, 1))]}]
_DK = " kdamond.0   158 [001]   {t}: damon:damon_region_aggregated: target_id=0 " \
      "nr_regions=2 {r}\n"
DAMO_TEXT = "".join(_DK.format(t=f"100.{i:09d}", r=r) for i, r in (
    (100, "4096-8192: 20 1 probe_hits=14 00"), (200, "8192-65536: 0 7 probe_hits=00 14"),
    (100000100, "4096-8192: 19 2 probe_hits=13 01"), (100000200, "8192-65536: 1 0"),
    (200000100, "4096-8192: 19 2")))


@st.composite
def damo_files(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "json_compressed", "text"]))
    if kind == "text":
        text = DAMO_TEXT
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(text)))
            j = draw(st.integers(i, min(len(text), i + 12)))
            text = text[:i] + draw(st.one_of(JUNK, NUM, st.sampled_from(
                [":", "-", " ", "\n", "probe_hits=", "damon:damon_aggregated: "]))) + text[j:]
        return text.encode("utf-8", "surrogatepass")
    obj = json.loads(json.dumps(DAMO_BASE))
    for _ in range(draw(st.integers(1, 3))):
        obj = _mutate_json(draw, obj)
    data = json.dumps(obj).encode()
    return zlib.compress(data) if kind == "json_compressed" else data


@fuzz(150, 10_000)
@given(data=damo_files(), kind=st.sampled_from(KINDS[:6]))
def test_damo_records_read_or_say_why(tmp_path, data, kind):
    """A damo record file udamon reads (json, json_compressed, perf script text), damaged
    anyhow: a Record or one InputError, and every report answers 0 or one line."""
    TRIED["damo record import"] += 1
    path = tmp_path / "d.data"
    path.write_bytes(data)
    try:
        read_record(str(path))
    except InputError as e:
        assert str(e)
        return
    check_cli(*cli("report", *kind, "-i", str(path)))


# -- what the fuzzing found (kept as plain regression tests) -----------------------------


@pytest.mark.parametrize("row,what", [
    # numpy's loadtxt took a lone non-ASCII character for its code point (pid 1110462) ...
    ("1,\U0010f1ee,1,0,4096,8,1,hint", "field 'pid'"),
    # ... and crashed the process (SIGSEGV) when an empty last field followed
    ("1,\U0010f1ee,1,0,4096,8,1,", "field 'pid'"),
    ("1,\u0663,1,0,4096,8,1,hint", "field 'pid'"),  # another script's digit 3
    # a time so late that its interval's end left the 64-bit clock: udamon wrote a record
    # its own reader refused
    ("9223372036854775807,1,1,0,4096,8,1,hint", "field 'time_ns'"),
])
def test_non_ascii_fields_are_line_errors(tmp_path, row, what):
    from conftest import run_udamon

    src = tmp_path / "u.csv"
    src.write_text("time_ns,pid,tid,cpu,addr,size,write,source\n" + row + "\n",
                   encoding="utf-8")
    p = run_udamon("record", "--input", str(src), "-o", str(tmp_path / "u.jsonl"))
    assert p.returncode == 2, (p.returncode, p.stderr)  # was -11 (SIGSEGV) or 0
    assert f"{src}:2: {what}" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr


def _damo_with(path: tuple, value) -> bytes:
    obj = json.loads(json.dumps(DAMO_BASE))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize("path,value,what", [
    # each was an internal error (OverflowError, TypeError, ValueError) of the damo import
    ((0, "snapshots", 0, "regions", 0, "nr_accesses"), 2**63, "nr_accesses"),
    ((0, "snapshots", 0, "regions", 0, "probe_hits"), [2**70], "probe hit"),
    ((0, "snapshots", 0, "regions", 0, "age"), {"aggr_intervals": "1e300"}, "age"),
    ((0, "snapshots", 0, "regions"), True, "regions must be a list"),
    ((0, "kdamond_idx"), "x", "kdamond_idx"),
    ((0, "snapshots", 0, "end_time"), "1e30", "end_time"),
    ((0, "snapshots", 1, "start_time"), "9 h 1.2.3 s", "start_time"),
])
def test_damaged_damo_numbers_are_one_line(tmp_path, path, value, what):
    f = tmp_path / "d.data"
    f.write_bytes(_damo_with(path, value))
    with pytest.raises(InputError, match=what):
        read_record(str(f))
    rc, err = cli("report", "access", "-i", str(f))
    assert rc == 2 and len(err.splitlines()) == 1 and what in err, err


@pytest.mark.skipif(not __import__("shutil").which("perf"), reason="perf is not installed")
def test_a_damaged_perf_data_file_is_bad_input(tmp_path):
    """b'PERFILE2' alone (perf.data's magic) was exit 1, a runtime failure: perf runs,
    the file is what it cannot read."""
    f = tmp_path / "x.data"
    f.write_bytes(b"PERFILE2")
    rc, err = cli("report", "access", "-i", str(f))
    assert rc == 2 and len(err.splitlines()) == 1 and "perf script" in err, (rc, err)


def test_huge_option_numbers_are_one_line(tmp_path):
    """'--duration 999...9s' (400 digits) was an internal OverflowError."""
    from conftest import run_udamon

    for opt, val in (("--duration", "9" * 400 + "s"), ("--sample", "9" * 30 + "h")):
        p = run_udamon("record", "--pid", "1", "-o", str(tmp_path / "x.jsonl"), opt, val)
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
        assert "internal error" not in p.stderr
    p = run_udamon("migrate", "--pid", "1", "--quota", "9" * 30 + "TiB")
    assert p.returncode == 2 and "larger than 2^64" in p.stderr, p.stderr
