"""Report channel throughput and loss: reports per second from other processes into a
live session, with every drop counted.

    python bench/bench_channel.py [--reports 4000000] [--seconds 2] [--repeat 3] [--json FILE]

For 1 and 4 producers (the C client demo, src/udamon/clients/udamon_report_demo.c,
flood mode: each producer thread sends its share as fast as it can) and both
client modes:

* ``block``: the producer waits when the socket is full, so nothing is lost; the
  rate is what the channel delivers (``--reports`` in all);
* ``drop`` (the clients' default): the producer never waits; for ``--seconds`` it
  offers as many reports as it can, what the socket cannot take is dropped and
  counted by the producer, and told to the session.

A session ``udamon record --primitive external --socket S --pid <producer>`` runs
until the producer exits.  Per run: reports/s = reports the session took / the
flood's wall time (every producer connected -> all closed); the session's CPU per
report = its utime+stime during the flood (from /proc, start-up excluded) / reports;
and whether the accounting is exact: the record's ``reports`` equal what the
producers sent, its ``lost_samples`` what they dropped, nothing unread.  Median and
spread over repeats; the goal is >= 1 M reports/s with exact accounting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CLK_TCK, ROOT, UDAMON, summary

sys.path.insert(0, str(ROOT / "tests"))
from workloads.build import build  # noqa: E402

GOAL = 1_000_000
DEMO = ROOT / "src" / "udamon" / "clients" / "udamon_report_demo.c"


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def one(demo: str, producers: int, reports: int, block: bool, seconds: float) -> dict:
    from udamon.record.reader import read_record

    tmp = Path(tempfile.mkdtemp(prefix="udamon-bench-channel-"))
    sock, rec = tmp / "s.sock", tmp / "rec.jsonl"
    prod = subprocess.Popen([demo, "--socket", str(sock), "--mode", "flood", "--producers",
                             str(producers), "--count", str(reports // producers),
                             *(["--block"] if block else ["--duration", str(seconds)])],
                            stdout=subprocess.PIPE, text=True)
    sess = subprocess.Popen([*UDAMON, "record", "--primitive", "external", "--socket",
                             str(sock), "--pid", str(prod.pid), "--duration", "600s", "-q",
                             "-o", str(rec)], stderr=subprocess.PIPE, text=True)
    try:
        json.loads(prod.stdout.readline())  # every producer connected: the flood starts
        cpu0 = _cpu_s(sess.pid)
        end = json.loads(prod.stdout.readline())
        cpu1 = _cpu_s(sess.pid)  # the flood is over once the producers have closed
        prod.wait(60)
        _, err = sess.communicate(timeout=120)
        if sess.returncode != 0:
            raise RuntimeError(f"session failed: {err.strip()}")
        r = read_record(str(rec))
    finally:
        for p in (prod, sess):
            if p.poll() is None:
                p.kill()
        subprocess.run(["rm", "-rf", str(tmp)])
    got = r.end["reports"]
    unread = sum(p["unread"] for p in r.end["producers"])
    exact = (got == end["sent"] and r.end["lost_samples"] == end["dropped"] and unread == 0
             and (not block or end["sent"] == reports // producers * producers))
    secs = end["flood_ns"] / 1e9
    return {"rate": got / secs, "offered": (end["sent"] + end["dropped"]) / secs,
            "sent": end["sent"], "dropped": end["dropped"], "reports": got,
            "cpu_us_per_report": (cpu1 - cpu0) * 1e6 / max(got, 1), "cpu_s": cpu1 - cpu0,
            "seconds": secs, "exact": exact}


def run(reports: int, repeat: int, seconds: float = 2.0, log=print) -> list[dict]:
    demo = build("udamon_report_demo", DEMO)
    rows = []
    for producers in (1, 4):
        for block in (True, False):
            runs = [one(demo, producers, reports if block else 1 << 40, block, seconds)
                    for _ in range(repeat)]
            row = {"producers": producers, "mode": "block" if block else "drop",
                   "reports_per_run": reports, "rate": summary([x["rate"] for x in runs]),
                   "offered": summary([x["offered"] for x in runs]),
                   "cpu_us_per_report": summary([x["cpu_us_per_report"] for x in runs]),
                   "dropped_share": summary([x["dropped"] / (x["dropped"] + x["sent"])
                                             for x in runs]),
                   "exact": all(x["exact"] for x in runs), "runs": runs}
            rows.append(row)
            log(f"  {producers} producer(s), {row['mode']}: {row['rate']['median'] / 1e6:.2f} M "
                f"reports/s, {row['cpu_us_per_report']['median']:.2f} us CPU/report, "
                f"exact accounting: {row['exact']}")
    return rows


def markdown(rows: list[dict], args: list[str]) -> list[str]:
    out = [f"`bench/bench_channel.py {' '.join(args)}`: the C client's flood mode into "
           "`udamon record --primitive external --socket` (reports/s = reports the session "
           "took / the flood's wall time; CPU = the session's utime+stime during the flood; "
           "exact = the record's `reports` and `lost_samples` equal what the producers sent "
           "and dropped, nothing unread; median (spread) over repeats).", "",
           "| producers | client mode | reports/s into the session | x goal (1 M/s) | "
           "offered reports/s | dropped by producers | session CPU per report | exact |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['producers']} | {r['mode']} | {r['rate']['median'] / 1e6:.2f} M "
                   f"({r['rate']['spread_pct']:.0f}%) | {r['rate']['median'] / GOAL:.2f} | "
                   f"{r['offered']['median'] / 1e6:.2f} M | "
                   f"{100 * r['dropped_share']['median']:.0f}% | "
                   f"{r['cpu_us_per_report']['median']:.2f} us | "
                   f"{'yes' if r['exact'] else '**NO**'} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", type=int, default=4_000_000, help="reports per run (total)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of a drop-mode run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    if a.reports < 4 or a.repeat < 1 or not 0 < a.seconds <= 60:
        print("bench_channel.py: --reports >= 4, --repeat >= 1, 0 < --seconds <= 60",
              file=sys.stderr)
        return 2
    t = time.monotonic()
    rows = run(a.reports, a.repeat, a.seconds,
               log=lambda s: print(s, file=sys.stderr, flush=True))
    args = [f"--reports {a.reports}", f"--seconds {a.seconds:g}", f"--repeat {a.repeat}"]
    print("\n".join(markdown(rows, args)))
    print(f"\n({time.monotonic() - t:.0f} s; load {os.getloadavg()[0]:.1f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": args, "rows": rows}, f, indent=1)
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
