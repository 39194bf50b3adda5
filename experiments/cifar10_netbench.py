"""Whole-network backward of the CIFAR-10 net (msbp.tasks.cifar10.CifarNet, width 32, batch 64,
1 thread): dense vs SBP vs MSBP (unified, stem and head dense) in NCHW and channels-last,
interleaved rounds, medians and min-max; writes /tmp/netbench.json (copied to
experiments/cifar10_netbench.json).

    PYTHONPATH=src python experiments/cifar10_netbench.py 5
"""

import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import msbp
from msbp.tasks.cifar10 import CifarNet

torch.set_num_threads(1)
torch.manual_seed(0)
variants = {}
for cl in (False, True):
    base = CifarNet(32)
    if cl:
        base = base.to(memory_format=torch.channels_last)
    tag = "CL" if cl else "NCHW"
    variants[f"dense {tag}"] = (copy.deepcopy(base), cl)
    for r in (0.1, 0.05):
        for mem in (0.0, 0.8):
            m = msbp.sparsify(
                copy.deepcopy(base),
                msbp.SparseBackpropConfig(ratio=r, memory=mem, selection="unified"),
                exclude=["stem.0", "head"],
            )
            variants[f"{'msbp' if mem else 'sbp'} {r} {tag}"] = (m, cl)
x = torch.randn(64, 3, 32, 32)
y = torch.randint(0, 10, (64,))
xcl = x.contiguous(memory_format=torch.channels_last)


def step(m, cl):
    out = m(xcl if cl else x)
    loss = F.cross_entropy(out, y)
    s = time.perf_counter()
    loss.backward()
    b = time.perf_counter() - s
    for p in m.parameters():
        p.grad = None
    return b


for v in variants.values():
    for _ in range(2):
        step(*v)
ts = {k: [] for k in variants}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 7):
    for k, v in variants.items():
        ts[k].append(step(*v))
d = {"NCHW": statistics.median(ts["dense NCHW"]), "CL": statistics.median(ts["dense CL"])}
rows = []
for k, v in ts.items():
    med = statistics.median(v)
    tag = k.split()[-1]
    rows.append(
        dict(
            variant=k,
            backward_ms=med * 1e3,
            min_ms=min(v) * 1e3,
            max_ms=max(v) * 1e3,
            speedup_same_format=d[tag] / med,
            speedup_vs_dense_nchw=d["NCHW"] / med,
        )
    )
    print(
        f"{k:22s} {med * 1e3:7.1f} ms ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})  "
        f"vs dense same fmt {d[tag] / med:.2f}x  vs dense NCHW {d['NCHW'] / med:.2f}x"
    )

json.dump(
    dict(batch=64, threads=1, rounds=len(ts["dense NCHW"]), rows=rows),
    open("/tmp/netbench.json", "w"),
    indent=1,
)
