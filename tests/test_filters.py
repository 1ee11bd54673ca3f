"""Filters and probes: the vectorised evaluator against a tiny reference one,
and the command line's AND-of-conditions translated into the ordered list."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udamon.intake.reports import MEM_LEVELS, SOURCES, make
from udamon.probes.filters import Filter, evaluate, evaluate_reference, parse_conditions
from udamon.probes.probe import Probe


def id_list(ftype, lo, hi, n):
    return st.builds(lambda ids: (ftype, "+".join(map(str, ids))),
                     st.lists(st.integers(lo, hi), min_size=1, max_size=n))


def with_flags(tv):
    return st.builds(lambda m, a: Filter(tv[0], tv[1], m, a), st.booleans(), st.booleans())


filter_st = st.one_of(
    id_list("cpus", 0, 7, 3),
    id_list("nodes", 0, 2, 2),
    id_list("threads", 100, 105, 3),
    id_list("pids", 1, 3, 2),
    st.just(("write", None)),
    st.just(("read", None)),
    st.builds(lambda a, n: ("addr", f"{a:#x}-{a + n:#x}"), st.integers(0, 1 << 20),
              st.integers(1, 1 << 20)),
    st.builds(lambda s: ("source", s), st.sampled_from(SOURCES)),
    st.builds(lambda s: ("mem", "+".join(s)),
              st.lists(st.sampled_from((*MEM_LEVELS, "local", "remote")), min_size=1,
                       max_size=3)),
).flatmap(with_flags)

report_st = st.fixed_dictionaries({
    "time_ns": st.integers(0, 10**9), "pid": st.integers(1, 3), "tid": st.integers(99, 106),
    "cpu": st.integers(-1, 8), "node": st.integers(-1, 2), "addr": st.integers(0, 1 << 21),
    "write": st.booleans(), "source": st.sampled_from(SOURCES),
    "mem": st.integers(0, len(MEM_LEVELS) - 1),
})


def to_array(reps):
    if not reps:
        return make(time_ns=[], pid=[], addr=[])
    cols = {k: [r[k] for r in reps] for k in reps[0] if k != "source"}
    arr = make(**cols)
    arr["source"] = [SOURCES.index(r["source"]) for r in reps]
    return arr


@settings(max_examples=400, deadline=None)
@given(st.lists(filter_st, max_size=5), st.lists(report_st, max_size=40))
def test_vectorised_matches_reference(filters, reps):
    arr = to_array(reps)
    got = evaluate(filters, arr)
    want = [evaluate_reference(filters, arr[i]) for i in range(arr.size)]
    assert got.tolist() == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(filter_st, st.booleans()), min_size=1, max_size=4),
       st.lists(report_st, min_size=1, max_size=40))
def test_conditions_mean_all_must_hold(conds, reps):
    """'C1,!C2,...' allows exactly the reports for which every condition holds."""
    arr = to_array(reps)
    text = ",".join(("!" if neg else "") + f.type + (f":{f.value}" if f.value else "")
                    for f, neg in conds)
    filters = parse_conditions(text)
    assert all(not f.allow for f in filters)
    got = evaluate(filters, arr)
    for i in range(arr.size):
        want = all(f.test_one(arr[i]) != neg for f, neg in conds)
        assert got[i] == want, (text, reps[i])


def test_default_rule_follows_last_filter():
    arr = make(time_ns=[0, 0], pid=1, addr=0, cpu=[0, 1])
    only_cpu0 = [Filter("cpus", "0", matching=True, allow=True)]
    # nothing decides for the CPU 1 report; the last filter allows -> default reject
    assert evaluate(only_cpu0, arr).tolist() == [True, False]
    not_cpu0 = [Filter("cpus", "0", matching=True, allow=False)]
    # last filter rejects -> undecided reports are allowed
    assert evaluate(not_cpu0, arr).tolist() == [False, True]
    assert evaluate([], arr).tolist() == [True, True]


def test_first_deciding_filter_wins():
    arr = make(time_ns=[0, 0, 0], pid=1, addr=0, cpu=[0, 1, 2], write=[True, True, False])
    fs = [Filter("cpus", "0", True, False), Filter("write", None, True, True)]
    # cpu0 write: rejected by the first filter even though the second would allow it
    assert evaluate(fs, arr).tolist() == [False, True, False]


def test_condition_syntax():
    fs = parse_conditions("cpus:0-3,8,!threads:42+43,write")
    assert [(f.type, f.value, f.matching, f.allow) for f in fs] == [
        ("cpus", "0-3,8", False, False), ("threads", "42+43", True, False),
        ("write", None, False, False)]
    arr = make(time_ns=[0] * 4, pid=1, addr=0, cpu=[8, 8, 4, 0], tid=[1, 42, 1, 1],
               write=[True, True, True, False])
    assert evaluate(fs, arr).tolist() == [True, False, False, False]


def test_unknown_cpu_never_matches_a_cpu_list():
    arr = make(time_ns=0, pid=1, addr=0, cpu=-1)
    assert evaluate(parse_conditions("cpus:0-1023"), arr).tolist() == [False]
    assert evaluate(parse_conditions("!cpus:0-1023"), arr).tolist() == [True]


@pytest.mark.parametrize("text,msg", [
    ("", "empty filter"),
    ("bogus:1", "unknown filter type"),
    ("cpus", "needs a value"),
    ("write:1", "takes no value"),
    ("cpus:a-b", "bad list item"),
    ("cpus:3-1", "end before start"),
    ("addr:0x10-0x5", "bad range"),
    ("source:nosuch", "unknown source"),
    ("mem:l4", "unknown memory level"),
    ("cpus:0,,write", "empty condition"),
    ("write,,read", "empty condition"),
])
def test_bad_conditions(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_conditions(text)


def test_mem_filter_aliases():
    """'local' and 'remote' are the two sides of the NUMA question (the data_src levels)."""
    arr = make(time_ns=[0] * 6, pid=1, addr=0, mem=list(range(6)))
    assert evaluate(parse_conditions("mem:local"), arr).tolist() == [
        False, True, True, False, False, False]
    assert evaluate(parse_conditions("mem:remote"), arr).tolist() == [
        False, False, False, True, True, False]
    assert evaluate(parse_conditions("!mem:unknown,mem:other+ram"), arr).tolist() == [
        False, False, True, False, False, True]


def test_filter_dict_round_trip_and_validation():
    for f in parse_conditions("cpus:1,!write,addr:0x1000-0x2000,source:hint"):
        assert Filter.from_dict(f.to_dict()) == f
    with pytest.raises(ValueError, match="unknown filter keys"):
        Filter.from_dict({"type": "write", "bogus": 1})
    with pytest.raises(ValueError, match="true or false"):
        Filter.from_dict({"type": "write", "allow": "yes"})


def test_probe_parse():
    p = Probe.parse("w1=cpus:1,write")
    assert p.name == "w1" and len(p.filters) == 2
    assert Probe.from_dict(p.to_dict()) == p
    for bad in ("nofilters", "=write", "bad name=write"):
        with pytest.raises(ValueError):
            Probe.parse(bad)


def test_evaluator_is_vectorised_on_large_batches():
    rng = np.random.default_rng(0)
    n = 200_000
    arr = make(time_ns=np.arange(n), pid=1, addr=rng.integers(0, 1 << 30, n),
               cpu=rng.integers(0, 4, n), write=rng.random(n) < 0.3)
    m = evaluate(parse_conditions("cpus:1+2,write"), arr)
    want = np.isin(arr["cpu"], [1, 2]) & arr["write"]
    assert (m == want).all()
