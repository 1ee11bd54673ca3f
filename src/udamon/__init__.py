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

from udamon.core.attrs import Attrs, IntervalsGoal  # noqa: E402
from udamon.core.monitor import Monitor, Snapshot, Target  # noqa: E402
from udamon.intake.reports import REPORT_DTYPE, SOURCES  # noqa: E402
from udamon.intake.reports import make as make_reports  # noqa: E402
from udamon.probes.filters import Filter, evaluate, parse_conditions  # noqa: E402
from udamon.probes.probe import Probe  # noqa: E402

__all__ = [
    "REPORT_DTYPE",
    "SOURCES",
    "Attrs",
    "Filter",
    "IntervalsGoal",
    "Monitor",
    "Probe",
    "Snapshot",
    "Target",
    "evaluate",
    "make_reports",
    "parse_conditions",
]
