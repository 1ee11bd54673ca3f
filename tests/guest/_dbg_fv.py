import json, os, subprocess, sys
sys.path.insert(0, "tests")
from workloads.build import build
from udamon.core.attrs import Attrs
from udamon.primitives.kernel import KernelPrimitive
from udamon.system import kernel_sysfs
b = build("access_pattern")
p = subprocess.Popen([b, "--duration", "120", "--size", "8"], stdout=subprocess.PIPE, text=True)
info = json.loads(p.stdout.readline())
lo = min(info[k][0] for k in "RWSI"); hi = max(info[k][1] for k in "RWSI")
print("range", hex(lo), hex(hi), flush=True)
orig = kernel_sysfs.Kdamond._why_not_on
def dump(self, msg):
    root = os.path.join(self.root, "kdamonds", str(self.idx))
    for d, _, fs in os.walk(root):
        for f in fs:
            path = os.path.join(d, f)
            try:
                v = open(path).read().strip()
            except OSError as e:
                v = f"<{e}>"
            if len(v) < 80:
                print(path[len(root):], "=", v)
    return orig(self, msg)
kernel_sysfs.Kdamond._why_not_on = dump
for rng in ([(lo, hi)], [(lo, lo + (8 << 20))]):
    prim = KernelPrimitive(Attrs(20_000, 400_000, 4_000_000, 10, 1000), ranges=rng)
    try:
        prim.start([info["pid"]])
        print("started", prim.ops, flush=True)
    except Exception as e:
        print("ERR", e, flush=True)
    finally:
        prim.stop()
p.terminate(); p.wait()
