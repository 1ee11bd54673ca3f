"""udamon: DAMON-style data access monitoring from user space.

Every access report says which CPU (and NUMA node) and which thread made it,
and whether it was a read or a write.  The library is what the ``udamon``
command drives::

    import udamon
    mon = udamon.Monitor(udamon.Attrs(sample_us=5000, aggr_us=100_000),
                         filters=udamon.parse_conditions("cpus:0,write"),
                         probes=[udamon.Probe.parse("reads=read")])
    mon.add_target(1234, ranges=[(0x10000, 0x20000)])
    mon.report_access(pid=1234, addr=0x10040, time_ns=0, cpu=0, tid=1234, write=True)
    for snap in mon.advance(now_ns=200_000_000):
        print(snap.pid, snap.nr_accesses)
"""

__version__ = "0.1.0"

# The public names load on first use (PEP 562): a tool that imports only a small
# part of udamon (e.g. the syscall-injection helper process) does not pay for numpy.
_LAZY = {
    "Attrs": ("udamon.core.attrs", "Attrs"),
    "IntervalsGoal": ("udamon.core.attrs", "IntervalsGoal"),
    "Monitor": ("udamon.core.monitor", "Monitor"),
    "Snapshot": ("udamon.core.monitor", "Snapshot"),
    "Target": ("udamon.core.monitor", "Target"),
    "REPORT_DTYPE": ("udamon.intake.reports", "REPORT_DTYPE"),
    "SOURCES": ("udamon.intake.reports", "SOURCES"),
    "make_reports": ("udamon.intake.reports", "make"),
    "Filter": ("udamon.probes.filters", "Filter"),
    "evaluate": ("udamon.probes.filters", "evaluate"),
    "parse_conditions": ("udamon.probes.filters", "parse_conditions"),
    "Probe": ("udamon.probes.probe", "Probe"),
    "Session": ("udamon.core.session", "Session"),
    "SessionResult": ("udamon.core.loop", "SessionResult"),
    "StopFlag": ("udamon.core.loop", "StopFlag"),
    "RecordSink": ("udamon.record.sink", "RecordSink"),
    "read_record": ("udamon.record.reader", "read_record"),
    "iter_record": ("udamon.record.reader", "iter_record"),
    "RecordReader": ("udamon.record.reader", "RecordReader"),
    "RecordDamaged": ("udamon.errors", "RecordDamaged"),
    "UdamonError": ("udamon.errors", "UdamonError"),
    "UsageError": ("udamon.errors", "UsageError"),
    "ParameterError": ("udamon.errors", "ParameterError"),
    "InputError": ("udamon.errors", "InputError"),
    "RuntimeFailure": ("udamon.errors", "RuntimeFailure"),
    "TargetGone": ("udamon.errors", "TargetGone"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    try:
        mod, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'udamon' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
