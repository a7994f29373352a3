"""Interleaved timing of checkouts of this repository, one fresh process per (round, tree):
python interleave.py OUT.json BACKEND[:DTYPE][,...] NAME=TREE [NAME=TREE ...]
(DTYPE float32 unless given; each TREE a checkout; the cpp backend needs its extension built in place there). The tree
order alternates between rounds so that the machine's load drifts over all trees alike."""
import json
import os
import subprocess
import sys
from pathlib import Path

out_path, backends = sys.argv[1], sys.argv[2].split(",")
trees = dict(arg.split("=", 1) for arg in sys.argv[3:])
ONE = str(Path(__file__).with_name("measure_one.py"))
env = {**os.environ, "OMP_NUM_THREADS": "1"}
out = []
for rnd in range(6):
    order = list(trees) if rnd % 2 == 0 else list(trees)[::-1]
    load = open("/proc/loadavg").read().split()[:3]
    for backend, _, dtype in (b.partition(":") for b in backends):
        for name in order:
            r = subprocess.run([sys.executable, ONE, trees[name], backend, dtype or "float32", "3"],
                               capture_output=True, text=True, env=env, check=True)
            rec = json.loads(r.stdout.strip().splitlines()[-1])
            rec.update(round=rnd, which=name, loadavg=load)
            out.append(rec)
            print(json.dumps(rec), flush=True)
json.dump(out, open(out_path, "w"), indent=1)
