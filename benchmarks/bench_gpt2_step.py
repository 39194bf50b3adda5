"""Does sparse backprop pay in full training of a small GPT-2 (transformers' Conv1D layers)?
One training step, dense vs with the blocks' layers sparsified.

GPT-2, width 512, 4 blocks, 8 heads, vocabulary 4096, batch 4 x 128 tokens, float32, every
parameter trained. Dense: fused Adam. Sparse:
``msbp.sparsify(model, ..., include="transformer.h.*")``
(each block's ``c_attn``, ``c_proj``, ``c_fc``, ``mlp.c_proj``: ``SparseHFConv1D``; the LM head,
tied to the embedding, stays dense), unified top-k, with fused Adam or ``LazyRowAdam`` (which
steps the Conv1D weights whole: their units are columns). Medians per step (ms) over
interleaved rounds in one process, random tokens. Needs transformers (the ``test`` extra).

    python benchmarks/bench_gpt2_step.py --threads 1 --rounds 7
"""

from __future__ import annotations

import logging

import torch
from bench_peft import compare_sparse_steps, with_optimizer

import msbp


def make(sparse: bool, optimizer: str, ratio: float, memory: float):
    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=4096, n_embd=512, n_layer=4, n_head=8, n_positions=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).train()
    if sparse:
        cfg = msbp.SparseBackpropConfig(ratio=ratio, memory=memory, selection="unified")
        msbp.sparsify(model, cfg, include="transformer.h.*")
    return with_optimizer(model, optimizer)


def main() -> None:
    compare_sparse_steps(__doc__, make, 4096)


if __name__ == "__main__":
    main()
