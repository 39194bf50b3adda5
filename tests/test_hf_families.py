"""Popular transformers families train sparsified as they come: `sparsify` converts every linear
layer, at k = out the sparsified model trains exactly as the dense one, the native kernels and
the PyTorch path compute the same step, and evaluation is the dense model's."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from _helpers import assert_steps_alike, assert_trains_as_dense, on_both_backends, train_records
from torch import nn

import msbp
from msbp import SparseBackpropConfig

transformers = pytest.importorskip("transformers")

CFG = SparseBackpropConfig(ratio=0.25, memory=0.8)
VOCAB = 24


def _causal_lm(cls_name: str, config_name: str, **extra):
    def make():
        config = getattr(transformers, config_name)(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
            attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
        )
        return getattr(transformers, cls_name)(config)
    return make


def _t5():
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config)


def _distilbert():
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=24, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0, max_position_embeddings=16,
        num_labels=3, pad_token_id=0,
    )
    return transformers.DistilBertForSequenceClassification(config)


def _roberta():
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, max_position_embeddings=16, num_labels=3, pad_token_id=1,
        type_vocab_size=1,
    )
    return transformers.RobertaForSequenceClassification(config)


def _vit():
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=24, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


FAMILIES = {
    "llama": _causal_lm("LlamaForCausalLM", "LlamaConfig"),
    "llama_tied": _causal_lm("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True),
    "qwen2": _causal_lm("Qwen2ForCausalLM", "Qwen2Config"),
    "mistral": _causal_lm("MistralForCausalLM", "MistralConfig", head_dim=8),
    "t5": _t5,
    "distilbert": _distilbert,
    "roberta": _roberta,
    "vit": _vit,
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        logging.disable(logging.WARNING)
        try:
            model = FAMILIES[name]().double()
        finally:
            logging.disable(logging.NOTSET)
            transformers.logging.set_verbosity_warning()
    return model.train()


def _batch(name: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64),
                "labels": torch.randint(0, 3, (2,), generator=gen)}
    ids = torch.randint(3, VOCAB, (2, 6), generator=gen)
    if name.startswith(("distilbert", "roberta")):
        return {"input_ids": ids, "labels": torch.randint(0, 3, (2,), generator=gen)}
    if name == "t5":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (2, 4), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def _train(model: nn.Module, name: str, steps: int = 2) -> list[dict[str, torch.Tensor]]:
    """Adam steps on fixed batches; the loss, gradients and memories after each backward."""
    return train_records(model, lambda step: model(**_batch(name, step)).loss, steps,
                         torch.optim.Adam)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_linear_layer_is_converted(name):
    model = _model(name)
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    msbp.sparsify(model, CFG)
    assert set(model.sparsify_report.converted) == layers
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("name", FAMILIES)
def test_k_equal_to_out_trains_as_the_dense_model(name):
    dense, sparse = _model(name), msbp.sparsify(_model(name), CFG.replace(ratio=1.0))
    assert_trains_as_dense(dense, sparse, _train(dense, name), _train(sparse, name))


@pytest.mark.parametrize("name", FAMILIES)
def test_native_and_pytorch_paths_train_alike(name):
    """memory_rows="all": with "active", a causal LM's first query row, zero in exact
    arithmetic, is zero or rounding noise depending on the bits upstream (README, "Padding"),
    which moves the memory's share of every row by more than rounding."""
    config = CFG.replace(memory_rows="all")
    assert_steps_alike(*on_both_backends(
        lambda: _train(msbp.sparsify(_model(name), config), name)
    ))


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_is_the_dense_model(name):
    model = msbp.sparsify(_model(name), CFG)
    _train(model, name, steps=1)
    model.eval()
    batch = _batch(name, 5)
    with torch.no_grad():
        sparse_out = model(**batch).logits
        dense_out = msbp.densify(model)(**batch).logits
    assert torch.equal(sparse_out, dense_out)
