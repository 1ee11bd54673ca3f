"""Cache-aware thread placement: from observed sharing to a plan of CPU masks.

Threads that access the same data from different last-level caches pay for it: a
line written in one LLC must be fetched from the other (coherence traffic), and
data read from both is held twice.  The plan groups threads by the data they share
and puts each group into one LLC domain:

- **weights**: the thread sharing matrix of ``report sharing`` (bytes of regions two
  threads both accessed in a snapshot, mean per snapshot), split into regions that
  someone wrote in that snapshot and regions only read; a pair's weight is
  ``read_only + write_weight * written`` (write sharing costs more: it invalidates).
- **capacity**: a domain holds at most ``max_load`` x its CPUs of CPU use (the
  threads' utime + stime per second over the window; when they use more than that
  together, each domain's fair share of the total), plus a slack of ``SLACK`` for
  measurement noise.  A starved thread counts what it got: packing threads into a
  domain that holds their present use does not take CPU from them.
- **allowed CPUs**: a thread only goes where its cgroup cpuset and its current
  affinity (or ``cpus_allowed`` given by the operator) allow; a thread whose allowed
  CPUs lie within one domain is *fixed* there, and its partners come to it.
- **grouping**: groups are joined, most shared first, while a common domain can hold
  them; a pair whose shared bytes are less than ``min_join`` of the bytes the less
  active of the two accessed is not joined (a region that straddles two threads'
  private data is noise, and noise must not move threads).  Groups go into domains
  biggest first, each to the domain its partners or its members already are in,
  else the least loaded one (groups spread over the LLCs), else where their threads
  run already; then single threads move where that lowers the cross-domain weight.  Only threads
  in a group of two or more get a new mask; the others are left as they are.

The predicted cross-domain share is the share of the pair weight whose two threads
are in different domains (before: expected from where the threads were seen running;
after: with the plan).  udamon.report.placement reads the sharing from a record and
measures the same share from its per-CPU probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from udamon.targets.topology import Topology, format_cpulist

SLACK = 0.1  # a domain may be loaded 10 % above its share: CPU use is measured, not known
DEFAULT_WRITE_WEIGHT = 4.0
DEFAULT_MIN_JOIN = 0.1


@dataclass
class ThreadInfo:
    tid: int
    comm: str
    starttime: int
    mask: frozenset[int]  # current affinity
    cpuset: frozenset[int] | None  # the cgroup cpuset's effective CPUs (None: unknown)
    allowed: frozenset[int]  # where the plan may put it
    cpu_use: float | None = None  # CPUs used during the window (what it weighs)
    runnable: float | None = None  # share of the time it ran or waited to run
    seen_on: dict[int, int] = field(default_factory=dict)  # cpu -> samples

    def load(self) -> float:
        return min(max(self.cpu_use if self.cpu_use is not None else 0.0, 0.0), 1.0)


@dataclass
class Sharing:
    """The thread sharing matrices of a record (from udamon.report.sharing)."""

    tids: list[int]
    total: np.ndarray  # bytes shared per snapshot (mean), diagonal: bytes accessed
    written: np.ndarray | None  # ... of which in regions written in the snapshot
    snapshots: int

    def read_only(self) -> np.ndarray:
        return self.total - (self.written if self.written is not None else 0.0)

    def weights(self, write_weight: float) -> np.ndarray:
        w = self.read_only() + (write_weight * self.written if self.written is not None
                                else 0.0)
        w = np.array(w, dtype=np.float64)
        np.fill_diagonal(w, 0.0)
        return w


@dataclass
class Entry:
    """What the plan does with one thread."""

    tid: int
    action: str  # "move" (new mask), "stay" (in its domain already), "fixed", "alone"
    why: str
    domain: int | None = None  # planned domain (grouped threads)
    new_mask: frozenset[int] | None = None  # None: left as it is


@dataclass
class Group:
    domain: int
    tids: list[int]
    load: float
    limit: float
    read_inside: float  # read-only bytes shared inside (per snapshot)
    written_inside: float


@dataclass
class Plan:
    topology: Topology
    threads: list[ThreadInfo]
    entries: dict[int, Entry]
    groups: list[Group]
    pairs: list[tuple[int, int, float, float, float]]  # a, b, read_only, written, weight
    weight_total: float
    predicted_before: float | None
    predicted_after: float | None
    write_weight: float
    max_load: float
    min_join: float
    loads_before: dict[int, float]  # domain -> expected load where threads run now
    loads_after: dict[int, float]
    notes: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.new_mask is not None]


def residency(t: ThreadInfo, topo: Topology) -> dict[int, float]:
    """Where the thread runs now, as a share per domain: the one domain its allowed
    CPUs lie in, else where it was seen running, else spread over its mask's CPUs."""
    d_of = topo.domain_of_cpu()
    mask = t.mask & t.cpuset if t.cpuset is not None else t.mask
    doms = {d_of[c] for c in mask if c in d_of}
    if len(doms) == 1:
        return {doms.pop(): 1.0}
    seen = {d_of[c]: 0 for c in t.seen_on if c in d_of}
    for c, n in t.seen_on.items():
        if c in d_of:
            seen[d_of[c]] += n
    tot = sum(seen.values())
    if tot:
        return {d: n / tot for d, n in sorted(seen.items()) if n}
    cpus = [c for c in mask if c in d_of] or list(d_of)
    out: dict[int, float] = {}
    for c in cpus:
        out[d_of[c]] = out.get(d_of[c], 0.0) + 1.0 / len(cpus)
    return dict(sorted(out.items()))


def _spread(t: ThreadInfo, topo: Topology) -> dict[int, float]:
    """Share of a thread's load per domain once the scheduler balances it: its mask's
    CPUs per domain (all of it in one domain when the mask lies in one)."""
    d_of = topo.domain_of_cpu()
    mask = t.mask & t.cpuset if t.cpuset is not None else t.mask
    cpus = [c for c in mask if c in d_of] or list(d_of)
    out: dict[int, float] = {}
    for c in cpus:
        out[d_of[c]] = out.get(d_of[c], 0.0) + 1.0 / len(cpus)
    return out


def cross_share(w: np.ndarray, dist: list[dict[int, float]]) -> float | None:
    """Share of the pair weight whose two threads are (expected to be) in different
    domains; None when there is no weight."""
    tot = cross = 0.0
    n = len(dist)
    for i in range(n):
        for j in range(i + 1, n):
            if w[i, j] <= 0:
                continue
            same = sum(p * dist[j].get(d, 0.0) for d, p in dist[i].items())
            tot += w[i, j]
            cross += w[i, j] * (1.0 - same)
    return cross / tot if tot > 0 else None


def plan(topo: Topology, threads: list[ThreadInfo], sh: Sharing, *,
         write_weight: float = DEFAULT_WRITE_WEIGHT, max_load: float = 1.0,
         min_join: float = DEFAULT_MIN_JOIN) -> Plan:
    """The placement plan for the threads alive now (``threads``) from the sharing seen
    in the window (``sh``); see the module docstring for the rules."""
    notes: list[str] = []
    by_tid = {t.tid: t for t in threads}
    idx = [i for i, tid in enumerate(sh.tids) if tid in by_tid]
    tids = [sh.tids[i] for i in idx]
    w_all = sh.weights(write_weight)
    ro_all, wr_all = sh.read_only(), (sh.written if sh.written is not None
                                      else np.zeros_like(sh.total))
    w = w_all[np.ix_(idx, idx)] if idx else np.zeros((0, 0))
    ro = ro_all[np.ix_(idx, idx)] if idx else np.zeros((0, 0))
    wr = wr_all[np.ix_(idx, idx)] if idx else np.zeros((0, 0))
    if sh.written is None:
        notes.append("the record has no write probe: read and write sharing weigh the same")
    n = len(tids)
    d_of = topo.domain_of_cpu()
    dom_ids = [d.id for d in topo.domains]
    dom_cpus = {d.id: set(d.cpus) for d in topo.domains}
    info = [by_tid[t] for t in tids]
    elig = [sorted({d_of[c] for c in t.allowed if c in d_of}) for t in info]
    dist_before_all = {t.tid: residency(t, topo) for t in threads}

    entries: dict[int, Entry] = {}
    monitored = set(tids)
    for t in threads:
        if t.tid not in monitored:
            entries[t.tid] = Entry(t.tid, "alone", "not monitored (no thread probe of its "
                                   "own in the window)")

    # capacity: each domain's CPUs x max_load, or its fair share of the total CPU use
    loads = {t.tid: t.load() for t in threads}
    total_use = sum(loads.values())
    cap = {d: len(dom_cpus[d]) * max_load for d in dom_ids}
    factor = max(1.0, total_use / max(sum(cap.values()), 1e-9))
    limit = {d: cap[d] * factor * (1 + SLACK) for d in dom_ids}

    # a pair may be brought together when it shares at least min_join of the bytes the
    # less active of the two accessed: a region straddling two threads' data is noise
    tot = sh.total[np.ix_(idx, idx)] if idx else np.zeros((0, 0))
    own = np.diag(tot) if n else np.zeros(0)
    least = np.minimum.outer(own, own) if n else np.zeros((0, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(least > 0, tot / np.where(least > 0, least, 1.0), 0.0)
    join = (w > 0) & (frac >= min_join)
    np.fill_diagonal(join, False)
    wj = np.where(join, w, 0.0)  # what placement decisions weigh: noise does not attract
    partners = [float(w[i].sum()) > 0 for i in range(n)]
    fixed = [len(e) == 1 for e in elig]
    # threads that take part: share with someone (above noise), may go somewhere
    active = [partners[i] and bool(elig[i]) and bool(join[i].any()) for i in range(n)]
    for i in range(n):
        if not elig[i]:
            entries[tids[i]] = Entry(tids[i], "alone", "none of its allowed CPUs is in a domain")
        elif not active[i]:
            entries[tids[i]] = Entry(tids[i], "fixed" if fixed[i] else "alone",
                                     "no sharing seen" if not partners[i] else
                                     "shares too little to be worth moving")

    # load of the threads that are not grouped: a thread bound to one domain stays
    # there; one the scheduler may move is counted by the CPUs its mask has per domain
    base = {d: 0.0 for d in dom_ids}
    grouped = {tids[i] for i in range(n) if active[i]}
    for t in threads:
        if t.tid in grouped:
            continue
        for d, p in _spread(t, topo).items():
            base[d] += loads[t.tid] * p

    # agglomerative grouping under the constraints
    groups: list[list[int]] = [[i] for i in range(n) if active[i]]

    def g_elig(g: list[int]) -> set[int]:
        s = set(dom_ids)
        for i in g:
            s &= set(elig[i])
        return s

    def g_load(g: list[int]) -> float:
        return sum(loads[tids[i]] for i in g)

    def g_w(a: list[int], b: list[int]) -> float:
        return float(wj[np.ix_(a, b)].sum())

    def fits(g: list[int], doms: set[int]) -> bool:
        return any(base[d] + g_load(g) <= limit[d] + 1e-9 for d in doms)

    while True:
        best = None
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                a, b = groups[x], groups[y]
                if not join[np.ix_(a, b)].any():
                    continue
                common = g_elig(a) & g_elig(b)
                if not common or not fits(a + b, common):
                    continue
                key = (g_w(a, b), -x, -y)
                if best is None or key > best[0]:
                    best = (key, x, y)
        if best is None:
            break
        _, x, y = best
        groups[x] = sorted(groups[x] + groups[y])
        del groups[y]

    # groups into domains, biggest first
    assign: dict[int, int] = {}  # thread index -> domain
    used = dict(base)
    order = sorted(range(len(groups)), key=lambda k: (-g_load(groups[k]), -len(groups[k]),
                                                     groups[k][0]))
    for k in order:
        g = groups[k]
        doms = sorted(g_elig(g))

        def score(d: int, g=g) -> tuple:
            # where it fits; to its partners; to the least loaded domain (groups spread
            # over the LLCs: more cache and CPUs each); where its threads run already
            room = limit[d] - used[d] - g_load(g)
            attract = sum(float(wj[i, j]) for i in g for j, dj in assign.items() if dj == d)
            rel = round((used[d] + g_load(g)) / max(cap[d], 1e-9), 2)
            here = sum(loads[tids[i]] * dist_before_all[tids[i]].get(d, 0.0) for i in g)
            return (room >= -1e-9, attract, -rel, here, -d)

        d = max(doms, key=score)
        if used[d] + g_load(g) > limit[d] + 1e-9:
            if len(g) == 1:  # a single thread that fits nowhere stays where it is
                continue
            notes.append(f"group {', '.join(str(tids[i]) for i in g)} loads {topo.domains[d].name}"
                         f" above its share ({used[d] + g_load(g):.2f} of {limit[d]:.2f} CPUs)")
        for i in g:
            assign[i] = d
        used[d] += g_load(g)

    # single threads move where that lowers the cross-domain weight and fits
    for _ in range(4 * max(n, 1)):
        improved = False
        for i in list(assign):
            cur = assign[i]
            for d in elig[i]:
                if d == cur or used[d] + loads[tids[i]] > limit[d] + 1e-9:
                    continue
                gain = sum(float(wj[i, j]) * ((assign[j] == d) - (assign[j] == cur))
                           for j in assign if j != i)
                if gain > 1e-9:
                    used[cur] -= loads[tids[i]]
                    used[d] += loads[tids[i]]
                    assign[i] = d
                    improved = True
                    break
        if not improved:
            break

    # final groups: threads per domain, connected by sharing; singletons stay as they are
    final: dict[int, list[int]] = {}
    for i, d in assign.items():
        final.setdefault(d, []).append(i)
    out_groups: list[Group] = []
    for d in sorted(final):
        members = sorted(final[d])
        for comp in _components(members, join):
            if len(comp) < 2:
                i = comp[0]
                entries[tids[i]] = Entry(tids[i], "fixed" if fixed[i] else "alone",
                                         "no partner fits in a domain with it")
                continue
            sub = np.ix_(comp, comp)
            out_groups.append(Group(d, [tids[i] for i in comp], g_load(comp), limit[d],
                                    float(np.triu(ro[sub], 1).sum()),
                                    float(np.triu(wr[sub], 1).sum())))
            for i in comp:
                t = info[i]
                if fixed[i]:
                    entries[t.tid] = Entry(t.tid, "fixed", "its allowed CPUs are all in "
                                           f"{topo.domains[d].name}", d)
                    continue
                new = frozenset(t.allowed & dom_cpus[d])
                if new == t.mask:
                    entries[t.tid] = Entry(t.tid, "stay", "its mask is that domain already", d)
                else:
                    why = f"shares with {_partner_text(i, comp, w, tids)}"
                    entries[t.tid] = Entry(t.tid, "move", why, d, new)

    for i in range(n):  # grouped at first, but no domain had room for it
        if tids[i] not in entries:
            entries[tids[i]] = Entry(tids[i], "fixed" if fixed[i] else "alone",
                                     "no partner fits in a domain with it")

    # predictions and loads, before and after
    dist_before = [dist_before_all[t] for t in tids]
    dist_after = []
    for i, t in enumerate(tids):
        e = entries[t]
        dist_after.append({e.domain: 1.0} if e.domain is not None and e.action != "alone"
                          else dist_before[i])
    loads_before = {d: 0.0 for d in dom_ids}
    loads_after = {d: 0.0 for d in dom_ids}
    for t in threads:
        e = entries.get(t.tid)
        after = ({e.domain: 1.0} if e is not None and e.domain is not None else
                 dist_before_all[t.tid])
        for d, p in dist_before_all[t.tid].items():
            loads_before[d] += loads[t.tid] * p
        for d, p in after.items():
            loads_after[d] += loads[t.tid] * p
    pairs = sorted(((tids[i], tids[j], float(ro[i, j]), float(wr[i, j]), float(w[i, j]))
                    for i in range(n) for j in range(i + 1, n) if w[i, j] > 0),
                   key=lambda p: (-p[4], p[0], p[1]))
    return Plan(topo, list(threads), dict(sorted(entries.items())), out_groups, pairs,
                float(np.triu(w, 1).sum()), cross_share(w, dist_before),
                cross_share(w, dist_after), write_weight, max_load, min_join,
                loads_before, loads_after, notes)


def _components(members: list[int], join: np.ndarray) -> list[list[int]]:
    """Connected components of ``members`` by the pairs that may be joined."""
    left = set(members)
    out = []
    while left:
        stack = [min(left)]
        comp = []
        left.discard(stack[0])
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in sorted(left):
                if join[i, j]:
                    left.discard(j)
                    stack.append(j)
        out.append(sorted(comp))
    return out


def _partner_text(i: int, comp: list[int], w: np.ndarray, tids: list[int]) -> str:
    best = max((j for j in comp if j != i), key=lambda j: (w[i, j], -j))
    return f"{tids[best]}" + (f" (+{len(comp) - 2} more)" if len(comp) > 2 else "")


# -- presentation -----------------------------------------------------------------


def pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def mask_text(m) -> str:
    return "-" if m is None else format_cpulist(m)


def thread_infos(pid: int, sampler, topo: Topology,
                 widen: frozenset[int] | None = None) -> dict[int, ThreadInfo]:
    """What the planner knows of each thread now: its mask, cgroup cpuset, the CPUs it
    may go to (``widen`` replaces its current mask, the cpuset still bounds it), and
    what ``sampler`` (a targets.threads.ThreadSampler) saw of its CPU use.  TargetGone
    when the process has exited."""
    from udamon.targets import threads as thr

    online = frozenset(topo.cpus)
    out: dict[int, ThreadInfo] = {}
    for tid, st in thr.list_threads(pid).items():
        try:
            mask = thr.get_mask(tid)
        except ProcessLookupError:
            continue
        cs = thr.cpuset_cpus(pid, tid)
        cpuset = frozenset(cs) if cs is not None else None
        allowed = (widen if widen is not None else mask) & online
        if cpuset is not None:
            allowed &= cpuset
        out[tid] = ThreadInfo(tid, st.comm, st.starttime, mask, cpuset, frozenset(allowed),
                              sampler.cpu_use(tid), sampler.runnable(tid),
                              dict(sampler.seen_on.get(tid, {})))
    return out
