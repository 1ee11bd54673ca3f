"""Which primitive answers which question: the short form of docs/guide.md, shown in
``udamon --help`` and in the help of every live command."""

from __future__ import annotations

GUIDE_HELP = """\
which primitive for which question (docs/guide.md):
  NUMA hit/miss      hint (any kernel) or rwp, with --breakdown numa; not wp (writes only)
  thread sharing     rwp (Linux 7.3+) or hint (minutes), with --breakdown thread,rw
  hot/cold, WSS      rwp (7.3+); wp for writes; hint says who/where, not how often
  dirty rate, KSM    wp (6.7+): exact writes; rwp and hint count a read-then-write
                     page as read (a lower bound), so they under-count writes
  auto picks rwp (Linux 7.3+), else hint, else wp, else pmu, and says why."""
