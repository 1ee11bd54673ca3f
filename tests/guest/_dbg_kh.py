import json, os, subprocess, sys, time
sys.path.insert(0, "tests")
from workloads.build import build
b = build("access_pattern")
p = subprocess.Popen([b, "--duration", "300", "--size", "8", "--flush-tlb", "--reader-cpu", "0",
                      "--writer-cpu", "1"], stdout=subprocess.PIPE, text=True,
                     preexec_fn=lambda: os.nice(10))
info = json.loads(p.stdout.readline())
print("workload", info, flush=True)
for prim in ("kernel,hint", "hint"):
    out = f"/tmp/kh-{prim.replace(',', '_')}.jsonl"
    r = subprocess.run([sys.executable, "-m", "udamon", "record", "--primitive", prim, "--pid",
                        str(info["pid"]), "--sample", "20ms", "--aggr", "400ms", "--breakdown",
                        "cpu,rw", "--duration", "15s", "-o", out], capture_output=True, text=True,
                       env=dict(os.environ, UDAMON_DEBUG="1"))
    print(prim, "rc", r.returncode, r.stderr[-1500:], flush=True)
    lines = [json.loads(x) for x in open(out)]
    print("header keys", list(lines[0].keys()))
    print("header primitives", lines[0].get("primitives"), lines[0].get("hint"))
    snaps = [x for x in lines[1:] if "regions" in x]
    print("snapshots", len(snaps), "nr_reports", [s.get("nr_reports") for s in snaps][:40])
    print("end", json.dumps(lines[-1])[:1500], flush=True)
p.terminate(); p.wait()
lines = [json.loads(x) for x in open("/tmp/kh-kernel_hint.jsonl")]
snaps = [x for x in lines[1:] if "regions" in x]
for b in "RWSI":
    lo, hi = info[b]
    tot = {}
    for s in snaps:
        for g in s["regions"]:
            ov = max(0, min(g["end"], hi) - max(g["start"], lo))
            if ov >= 0.9 * (g["end"] - g["start"]):
                for k, v in g["probes"].items():
                    tot[k] = tot.get(k, 0) + v
    print("buffer", b, tot)
s = snaps[len(snaps) // 2]
print([(hex(g["start"]), (g["end"] - g["start"]) >> 20, g["nr_accesses"], g["probes"]) for g in s["regions"]])
