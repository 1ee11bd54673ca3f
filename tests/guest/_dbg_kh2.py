import json, os, subprocess, sys
sys.path.insert(0, "tests")
from workloads.build import build
b = build("access_pattern")
p = subprocess.Popen([b, "--duration", "300", "--size", "8", "--flush-tlb", "--reader-cpu", "0",
                      "--writer-cpu", "1"], stdout=subprocess.PIPE, text=True,
                     )
info = json.loads(p.stdout.readline())
I0 = info["I"][0]
print("buffers (MiB from I0):", {k: ((info[k][0] - I0) >> 20, (info[k][1] - I0) >> 20) for k in "RWSI"})
for prim in ("hint", "kernel,hint"):
    out = f"/tmp/kh2.jsonl"
    r = subprocess.run([sys.executable, "-m", "udamon", "record", "--primitive", prim, "--pid",
                        str(info["pid"]), "--sample", "20ms", "--aggr", "400ms",
                        *(["--breakdown", "cpu,rw"] if "hint" in prim else []),
                        "--duration", "20s", "-q", "-o", out], capture_output=True, text=True,
                       env=dict(os.environ, UDAMON_DEBUG="1"))
    print(prim, "rc", r.returncode, r.stderr[-500:], flush=True)
    lines = [json.loads(x) for x in open(out)]
    snaps = [x for x in lines[1:] if "regions" in x]
    tot = {}
    for s in snaps:
        for g in s["regions"]:
            for b in "RWSI":
                lo, hi = info[b]
                ov = max(0, min(g["end"], hi) - max(g["start"], lo))
                if ov:
                    for k, v in g["probes"].items():
                        tot[(b, k)] = tot.get((b, k), 0) + v * ov / (g["end"] - g["start"])
    print("  per buffer", {k: round(v, 1) for k, v in sorted(tot.items())}, flush=True)
    print("  end", lines[-1].get("end", {}).get("notes"), flush=True)
    for s in snaps[-2:]:
        row = []
        for g in s["regions"]:
            if g["end"] > I0 and g["start"] < info["R"][1]:
                row.append((round((g["start"] - I0) / 2**20, 2), round((g["end"] - I0) / 2**20, 2),
                            g["nr_accesses"], {k: v for k, v in g["probes"].items() if v}))
        print("  ", s.get("nr_reports"), row, flush=True)
p.terminate(); p.wait()
