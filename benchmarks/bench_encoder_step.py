"""Does sparse backprop pay in full training of a small transformer encoder (PyTorch's own
layers)? One training step, dense vs with the encoder's layers sparsified.

``nn.TransformerEncoder`` of 4 ``nn.TransformerEncoderLayer`` (width 512, 8 heads, feed-forward
2048, batch first, no dropout) between a token embedding (vocabulary 4096, learned positions) and
a dense output layer, next-token loss, batch 4 x 128 tokens, float32, every parameter trained.
Dense: fused Adam. Sparse: ``msbp.sparsify(model, ..., include="encoder.*")`` (each layer's
``self_attn``: ``SparseMultiheadAttention``, its q, k, v and output projections sparse;
``linear1``, ``linear2``: ``SparseLinear``), unified top-k, with fused Adam or ``LazyRowAdam``.
Medians per step (ms) over interleaved rounds in one process, random tokens.

    python benchmarks/bench_encoder_step.py --threads 1 --rounds 7
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from bench_peft import compare_sparse_steps, with_optimizer
from torch import nn

import msbp

VOCAB, WIDTH, LAYERS, HEADS, POSITIONS = 4096, 512, 4, 8, 256


class _Encoder(nn.Module):
    """Embedding, encoder, output layer; ``model(input_ids=, labels=).loss`` as transformers'
    models, so that bench_peft's timing loop runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Embedding(POSITIONS, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.encoder(self.embed(input_ids) + self.position(positions))
        logits = self.head(h[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss)


def make(sparse: bool, optimizer: str, ratio: float, memory: float):
    torch.manual_seed(0)
    model = _Encoder().train()
    if sparse:
        cfg = msbp.SparseBackpropConfig(ratio=ratio, memory=memory, selection="unified")
        msbp.sparsify(model, cfg, include="encoder.*")
    return with_optimizer(model, optimizer)


def main() -> None:
    compare_sparse_steps(__doc__, make, VOCAB)


if __name__ == "__main__":
    main()
