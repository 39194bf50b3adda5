"""What the memory does inside the POS tagger's LSTM: a probe on its two transforms.

For MSBP (per-example top-k, ratio 0.04, memory 0.8) it trains the tagger for ``--steps`` batches
and reports, over the last half of them, per transform (input ``ih``, recurrent ``hh``):
- ``hijack``: the share of the kept entries that are not among the row's top-k of |G| alone,
  i.e. that the memory's add-back won;
- ``mem/g``: the norm of the memory added to an active row (M / n) over the mean norm of a
  row of G;
- ``zero``: the share of rows of G that are all zero (padding; the input transform's probe sees
  the active rows only under ``memory_rows="active"``).

    python experiments/memory_variants/diagnose_pos.py --steps 40 --memory-rows all
"""

from __future__ import annotations

import argparse
import statistics

import torch

import msbp
from msbp.tasks.pos import PosTask


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--memory", type=float, default=0.8)
    p.add_argument("--memory-rows", default="active")
    p.add_argument("--ratio", type=float, default=0.04)
    p.add_argument("--limit-train", type=int, default=2000)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    args = argparse.Namespace(task="pos", pos_data="ud", limit_train=a.limit_train,
                              limit_eval=10, batch_size=32, quiet=True, bucket=20)
    task = PosTask(args)
    model = task.build_model()
    cfg = msbp.SparseBackpropConfig(ratio=a.ratio, selection="per_example", memory=a.memory,
                                    memory_rows=a.memory_rows)
    msbp.sparsify(model, cfg, exclude="output")
    lstm = model.lstm
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    k = cfg.k_for(4 * lstm.hidden_size)
    stats: dict[str, dict[str, list[float]]] = {t: {"hijack": [], "mem/g": [], "zero": []}
                                               for t in ("ih_l0", "hh_l0")}
    step = [0]
    batch_rows = [32]

    def probe_for(tag):
        def probe(g, x, propagated):
            if step[0] < a.steps // 2:
                return
            active = g.ne(0).any(1)
            s = stats[tag]
            s["zero"].append(1 - active.float().mean().item())
            if not active.any():
                return
            ga, pa = g[active], propagated[active]
            kept = pa != 0
            top = torch.zeros_like(kept).scatter_(1, ga.abs().topk(k, 1).indices, True)
            s["hijack"].append(((kept & ~top).sum() / kept.sum().clamp(min=1)).item())
            mem = getattr(lstm, f"memory_{tag}")
            n = int(active.sum()) if a.memory_rows == "active" else g.shape[0]
            if tag.startswith("hh"):  # spread over the rows of one time step
                n = n * batch_rows[0] / g.shape[0]
            s["mem/g"].append((mem.norm() / n / ga.norm(dim=1).mean()).item())
        return probe

    for tag in stats:
        lstm.probes[tag] = probe_for(tag)
    gen = torch.Generator().manual_seed(1)
    batches = task.train_batches(0, gen)
    for step[0] in range(a.steps):
        batch = next(batches)
        batch_rows[0] = batch[0].shape[0]
        opt.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        opt.step()
    print(f"memory {a.memory}, memory_rows={a.memory_rows}, k={k} of {4 * lstm.hidden_size}, "
          f"steps {a.steps // 2}-{a.steps}: median (min-max) over calls")
    for tag, s in stats.items():
        parts = [f"{name} {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
                 for name, v in s.items() if v]
        print(f"  {tag}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
