"""Does sparse backprop pay in a LoRA fine-tune (peft)? One training step of a small Llama-like
model with LoRA adapters, dense vs with the frozen base layers sparsified.

Llama, hidden 512, 4 blocks, intermediate 1408, 8 heads, vocabulary 4096, batch 4 x 128 tokens,
float32; LoRA r=8 on every linear layer of the blocks (q, k, v, o, gate, up, down), AdamW
(fused) on the adapters. Sparse variants: ``msbp.sparsify`` of the base model's block layers
(``include="model.layers.*"``, unified top-k) before ``get_peft_model``, so the frozen
``base_layer`` of each adapter is sparse and the adapters (lora_A / lora_B) stay dense; the
output layer stays dense. "+ adapters sparse" sparsifies after ``get_peft_model`` instead,
adapters included. Medians per step (ms) over interleaved rounds in one process, random tokens.
Needs peft (not a dependency of msbp).

    python benchmarks/bench_peft.py --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

import msbp

PHASES = ("forward", "backward", "step")


def make(variant: str, ratio: float, memory: float):
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).train()
    sparse = msbp.SparseBackpropConfig(ratio=ratio, memory=memory, selection="unified")
    if variant == "base sparse":
        msbp.sparsify(model, sparse, include="model.layers.*")
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"],
    )
    model = get_peft_model(model, lora)
    if variant == "base + adapters sparse":
        msbp.sparsify(model, sparse, include="base_model.model.model.layers.*")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, fused=True)


def run_round(model, opt, batches) -> list[float]:
    totals = [0.0] * len(PHASES)
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            totals[i] += dt
    return [t / len(batches) for t in totals]


def step_args(doc: str, ratio: float) -> argparse.Namespace:
    """The command line of a step benchmark (threads, rounds, steps, ratio, batch, sequence),
    parsed, with the thread count and the denormal flush set."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--ratio", type=float, default=ratio)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    return args


def time_variants(built: dict, args: argparse.Namespace, vocab: int) -> dict[str, list]:
    """Per variant, one [forward, backward, step] list of seconds per round: random batches of
    token ids below ``vocab``, a warm-up step each, then the variants interleaved round by
    round."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, vocab, (args.batch_size, args.seq), generator=gen)
               for _ in range(args.steps)]
    for model, opt in built.values():  # warm-up: kernels built, buffers allocated
        run_round(model, opt, batches[:1])
    times: dict[str, list[list[float]]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (model, opt) in built.items():
            times[name].append(run_round(model, opt, batches))
    return times


def print_table(times: dict[str, list], args: argparse.Namespace, baseline: str) -> None:
    """Medians per phase (ms), the total with its spread, and the backward's and the whole
    step's speed-up over ``baseline``."""
    base = [statistics.median(r[i] for r in times[baseline]) for i in range(len(PHASES))]
    base_total = statistics.median(sum(t) for t in times[baseline])
    width = max(len(name) for name in times) + 2
    print(f"threads {args.threads}, {args.rounds} rounds x {args.steps} steps, batch "
          f"{args.batch_size} x {args.seq}; ms per step, median (min-max over rounds)")
    print(f"{'variant':<{width}} {'forward':>8} {'backward':>9} {'step':>7} {'total':>16} "
          f"{'bwd x':>6} {'x dense':>8}")
    for name, rounds in times.items():
        med = [statistics.median(r[i] for r in rounds) * 1e3 for i in range(len(PHASES))]
        totals = [sum(r) * 1e3 for r in rounds]
        total = statistics.median(totals)
        print(f"{name:<{width}} {med[0]:8.1f} {med[1]:9.1f} {med[2]:7.1f} "
              f"{total:7.1f} ({min(totals):.0f}-{max(totals):.0f}) "
              f"{base[1] * 1e3 / med[1]:6.2f} {base_total * 1e3 / total:8.2f}")


def with_optimizer(model, optimizer: str):
    """``(model, its optimizer)``: ``LazyRowAdam`` for "lazy", else fused Adam; lr 1e-4."""
    if optimizer == "lazy":
        return model, msbp.optim.LazyRowAdam(model.parameters(), lr=1e-4)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)


def compare_sparse_steps(doc: str, make, vocab: int) -> None:
    """A whole-step benchmark's main: dense with fused Adam against the model with layers
    sparse at ``--ratio`` (MSBP with fused Adam or ``LazyRowAdam``, SBP with fused Adam), each
    built by ``make(sparse, optimizer, ratio, memory)``, on random tokens below ``vocab``."""
    args = step_args(doc, 0.04)
    variants = {
        "dense, fused Adam": (False, "adam", 0.0),
        f"MSBP 0.8 ({args.ratio}), fused Adam": (True, "adam", 0.8),
        f"MSBP 0.8 ({args.ratio}), LazyRowAdam": (True, "lazy", 0.8),
        f"SBP ({args.ratio}), fused Adam": (True, "adam", 0.0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = {name: make(s, o, args.ratio, m) for name, (s, o, m) in variants.items()}
    print_table(time_variants(built, args, vocab), args, "dense, fused Adam")


def main() -> None:
    args = step_args(__doc__, 0.1)
    variants = {
        "dense LoRA": ("dense", 0.0),
        f"base sparse, SBP ({args.ratio})": ("base sparse", 0.0),
        f"base sparse, MSBP 0.2 ({args.ratio})": ("base sparse", 0.2),
        f"base + adapters sparse, SBP ({args.ratio})": ("base + adapters sparse", 0.0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = {name: make(v, args.ratio, mem) for name, (v, mem) in variants.items()}
    print_table(time_variants(built, args, 4096), args, "dense LoRA")


if __name__ == "__main__":
    main()
