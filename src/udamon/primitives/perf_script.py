"""Read ``perf script`` output as access reports (``--input-format perf-script``).

perf prints a sample's fields in a fixed order whatever the order given to
``-F`` (tools/perf/builtin-script.c: process_event and perf_sample__fprintf_start):
``comm``, ``pid/tid``, ``[cpu]``, ``time:``, ``period``, ``event:``, then the
tracepoint's fields (``trace``), ``addr`` (``%16lx``), ``data_src`` (``%16lx`` and
its decoded text ``|OP ...|LVL ...|SNP ...|TLB ...|LCK ...|BLK ...``), ``weight``,
``ip`` and symbols.  What udamon needs and therefore requires: ``pid``, ``tid``,
``cpu``, ``time``, ``event`` and either ``addr`` or the tracepoint's ``address``.
Three kinds of samples are understood:

* precise memory samples (``perf mem record``: Intel PEBS, AMD IBS, Arm SPE as
  perf synthesises them), recognised by their ``data_src``:
  ``perf script -F pid,tid,cpu,time,event,addr,data_src,weight --ns``; the
  exact address is kept (size 1), load/store and the memory level come from the
  data_src value (udamon.primitives.perf_mem), source ``pmu``;
* the software ``page-faults`` event recorded with ``-d --sample-cpu``:
  ``perf script -F pid,tid,cpu,time,event,addr --ns``; the faulting page, a read
  (the event does not say which), source ``perf``;
* ``exceptions:page_fault_user`` tracepoint samples:
  ``perf script -F pid,tid,cpu,time,event,trace --ns``; the faulting page, a
  write when bit 1 of ``error_code`` is set, source ``perf``.

Times are perf's sample times (``--ns`` keeps nanoseconds; without it perf prints
microseconds) in the clock perf recorded with (``perf record -k monotonic`` for
CLOCK_MONOTONIC): replay takes the input's clock as it is.  Kernel addresses and
memory samples that are neither a load nor a store are counted and left out.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from udamon.errors import InputError
from udamon.intake.reports import MEM_LEVELS, SOURCE_IDS, empty
from udamon.primitives import perf_mem
from udamon.primitives.replay import ADDR_END, CHUNK, _open_text

PAGE = 4096
KERNEL_START = 1 << 63  # at or above: kernel addresses (x86-64 and arm64 alike)

_LINE = re.compile(
    r"^\s*(?:(?P<comm>.*?)\s+)?(?P<pid>-?\d+)/(?P<tid>-?\d+)\s+\[(?P<cpu>\d+)\]\s+"
    r"(?P<sec>\d+)\.(?P<frac>\d+):\s+(?:(?P<period>\d+)\s+)?(?P<event>\S+):(?:\s+(?P<rest>.*))?$")
_TRACE = re.compile(r"\baddress=(?P<addr>0x[0-9a-fA-F]+).*?\berror_code=(?P<ec>0x[0-9a-fA-F]+)")
_ADDR = re.compile(r"^(?P<addr>[0-9a-fA-F]+)\b")
_DSRC = re.compile(r"^\s*(?P<ds>[0-9a-fA-F]+)\s+\|OP\s.*?\|BLK\s+(?:N/A|Data|Addr|Data Addr)"
                   r"(?:\s+(?P<weight>\d+))?")
EXAMPLE = ("perf script -F pid,tid,cpu,time,event,addr --ns (page-faults recorded with -d "
           "--sample-cpu), ...,event,addr,data_src,weight (perf mem), ...,event,trace "
           "(exceptions:page_fault_user)")


@dataclass
class PerfScriptStats:
    """What an import saw, for the record's notes."""

    samples: int = 0
    events: Counter = field(default_factory=Counter)
    kernel_addr: int = 0  # samples with a kernel address (left out)
    not_memory: int = 0  # memory samples that were neither a load nor a store
    loads: int = 0
    stores: int = 0
    levels: Counter = field(default_factory=Counter)
    weight_sum: Counter = field(default_factory=Counter)  # per level, loads only
    weight_n: Counter = field(default_factory=Counter)

    def notes(self) -> list[str]:
        out = ["perf script input: " + ", ".join(f"{n} {e}" for e, n in
                                                 self.events.most_common())]
        if self.loads or self.stores:
            lv = ", ".join(f"{MEM_LEVELS[k]} {n}" for k, n in sorted(self.levels.items()))
            lat = ", ".join(f"{MEM_LEVELS[k]} {self.weight_sum[k] / self.weight_n[k]:.0f}"
                            for k in sorted(self.weight_n) if self.weight_n[k])
            out.append(f"perf mem samples: {self.loads} loads, {self.stores} stores; memory "
                       f"levels: {lv}" + (f"; mean load weight by level: {lat}" if lat else ""))
        if self.kernel_addr:
            out.append(f"{self.kernel_addr} samples with a kernel address were left out")
        if self.not_memory:
            out.append(f"{self.not_memory} memory samples that were neither a load nor a "
                       "store were left out")
        return out


def _ns(sec: str, frac: str) -> int:
    """'1711.574852387' -> ns exactly (microseconds when perf printed 6 digits)."""
    return int(sec) * 1_000_000_000 + int(frac[:9].ljust(9, "0"))


def read_perf_script(path: str, chunk: int = CHUNK, linenos_out: list[int] | None = None,
                     stats: PerfScriptStats | None = None) -> Iterator[np.ndarray]:
    """Yield REPORT_DTYPE chunks; InputError naming FILE:LINE on what is not a sample
    udamon can use (same contract as replay.read_csv)."""
    st = stats if stats is not None else PerfScriptStats()
    f = _open_text(path)
    with f:
        cols: dict[str, list] = {k: [] for k in
                                 ("time_ns", "pid", "tid", "cpu", "addr", "size", "write",
                                  "source", "mem", "lineno")}
        last_t: int | None = None
        lineno = 0
        try:
            for line in f:
                lineno += 1
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                rep = _parse_line(path, lineno, line, st)
                if rep is None:
                    continue
                t = rep[0]
                if last_t is not None and t < last_t:
                    raise InputError(f"{path}:{lineno}: time goes backwards ({t} ns after "
                                     f"{last_t} ns); perf script sorts samples by time "
                                     "unless told not to")
                last_t = t
                for k, v in zip(cols, (*rep, lineno), strict=True):
                    cols[k].append(v)
                if len(cols["time_ns"]) >= chunk:
                    yield _emit(cols, linenos_out)
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: line {lineno + 1} is not UTF-8 text ({e.reason})") \
                from None
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: cannot read ({e})") from None
        if lineno == 0:
            raise InputError(f"{path}: empty file (expected the output of {EXAMPLE})")
        if cols["time_ns"]:
            yield _emit(cols, linenos_out)
        elif st.samples == 0:
            raise InputError(f"{path}: no samples in it")


def _parse_line(path: str, lineno: int, line: str, st: PerfScriptStats):
    m = _LINE.match(line.rstrip("\n"))
    if m is None:
        raise InputError(f"{path}:{lineno}: not a perf script sample line with "
                         f"'PID/TID [CPU] TIME: EVENT:' (use {EXAMPLE})")
    st.samples += 1
    event = m.group("event")
    st.events[event] += 1
    rest = m.group("rest") or ""
    pid, tid, cpu = int(m.group("pid")), int(m.group("tid")), int(m.group("cpu"))
    t = _ns(m.group("sec"), m.group("frac"))
    mem = 0
    weight = None
    tm = _TRACE.search(rest)
    if tm is not None:  # exceptions:page_fault_user (or any fault tracepoint like it)
        addr = int(tm.group("addr"), 16)
        write = (int(tm.group("ec"), 16) >> 1) & 1
        addr &= ~(PAGE - 1)
        size, source = PAGE, SOURCE_IDS["perf"]
    else:
        am = _ADDR.match(rest)
        if am is None:
            raise InputError(f"{path}:{lineno}: event {event!r} has no address: record with "
                             "-d (data addresses) and print it with -F ...,addr (or the "
                             "tracepoint's fields with -F ...,trace)")
        addr = int(am.group("addr"), 16)
        dm = _DSRC.match(rest[am.end():])
        if dm is not None:  # a precise memory sample
            store, load, level = perf_mem.decode([int(dm.group("ds"), 16)])
            if not (store[0] or load[0]):
                st.not_memory += 1
                return None
            write = int(store[0])
            mem = int(level[0])
            weight = int(dm.group("weight")) if dm.group("weight") else None
            size, source = 1, SOURCE_IDS["pmu"]
        else:  # page-faults (or another event sampled with -d): a page, read or write unknown
            write = 0
            addr &= ~(PAGE - 1)
            size, source = PAGE, SOURCE_IDS["perf"]
    if addr >= KERNEL_START:
        st.kernel_addr += 1
        return None
    if source == SOURCE_IDS["pmu"]:
        st.stores += write
        st.loads += 1 - write
        st.levels[mem] += 1
        if weight is not None and not write:
            st.weight_sum[mem] += weight
            st.weight_n[mem] += 1
    if addr + size > ADDR_END or pid < 0:
        raise InputError(f"{path}:{lineno}: address {addr:#x} or pid {pid} out of range")
    if not (pid < 1 << 31 and -1 <= tid < 1 << 31 and cpu < 1 << 31):
        raise InputError(f"{path}:{lineno}: pid {pid}, tid {tid} or cpu {cpu} out of range "
                         "(32-bit ids)")
    if t > 1 << 62:  # (interval ends after it must fit the record's 64-bit clock)
        raise InputError(f"{path}:{lineno}: time {m.group('sec')}.{m.group('frac')} s is "
                         "beyond 2^62 ns")
    return t, pid, tid, cpu, addr, size, write, source, mem


def _emit(cols: dict[str, list], linenos_out: list[int] | None) -> np.ndarray:
    n = len(cols["time_ns"])
    out = empty(n)
    for k in ("time_ns", "pid", "tid", "cpu", "addr", "size", "write", "source", "mem"):
        out[k] = np.asarray(cols[k], dtype=out.dtype[k])
    if linenos_out is not None:
        linenos_out[:] = cols["lineno"]
    for v in cols.values():
        v.clear()
    return out
