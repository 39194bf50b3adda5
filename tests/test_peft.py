"""msbp with LoRA fine-tuning through peft: the frozen base layers (and, if asked, the adapters)
sparsified before or after ``get_peft_model``. At k = out a step is the dense LoRA step, the
native kernels and the PyTorch path compute the same steps, frozen weights never move, and
evaluation, adapter saving and merging see the dense model. Skipped where peft is absent."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from _helpers import assert_steps_alike, assert_trains_as_dense, on_both_backends, train_records

import msbp
from msbp import SparseBackpropConfig
from msbp.convert import LORA_ADAPTER
from msbp.optim import LazyRowAdam

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 24
CFG = SparseBackpropConfig(ratio=0.25, memory=0.8)
TARGETS = ["q_proj", "v_proj", "down_proj"]
#: "before": msbp.sparsify, then get_peft_model (the base layers sparse, the adapters dense);
#: "after": get_peft_model, then msbp.sparsify (the adapters dense unless included)
ORDERS = ("before", "after")


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        logging.disable(logging.WARNING)
        try:
            return transformers.LlamaForCausalLM(config).double().train()
        finally:
            logging.disable(logging.NOTSET)
            transformers.logging.set_verbosity_warning()


def _lora(order: str | None, config: SparseBackpropConfig = CFG, **filters):
    """A LoRA model (r = 4, B not zero so that every adapter has a gradient at once), sparsified
    in ``order`` (None: dense)."""
    base = _llama()
    if order == "before":
        base = msbp.sparsify(base, config, **filters)
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                           init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    if order == "after":
        model = msbp.sparsify(model, config, **filters)
    return model


def _batch(seed: int) -> dict:
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _train(model, steps: int = 2, optimizer=torch.optim.AdamW) -> list[dict[str, torch.Tensor]]:
    """Steps on the trainable parameters; the loss, gradients and memories after each backward."""
    return train_records(model, lambda step: model(**_batch(step)).loss, steps, optimizer)


def _trained(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", ORDERS)
def test_k_equal_to_out_trains_as_dense_lora(order):
    dense = _lora(None)
    sparse = _lora(order, SparseBackpropConfig(ratio=1.0, memory=0.0))
    assert _trained(sparse) == _trained(dense) and all("lora_" in n for n in _trained(dense))
    assert_trains_as_dense(dense, sparse, _train(dense), _train(sparse))


@pytest.mark.parametrize(("order", "optimizer"), [("before", torch.optim.AdamW),
                                                  ("after", LazyRowAdam)])
def test_native_and_pytorch_paths_train_alike(order, optimizer):
    """memory_rows="all", as in test_hf_families: a causal LM's first query row is zero or
    rounding noise depending on the bits upstream. "after" sparsifies every layer, the adapters
    too (include="*"), so that trained sparse layers take row-sparse steps."""
    def run() -> list[dict[str, torch.Tensor]]:
        model = _lora(order, CFG.replace(memory_rows="all"),
                      **({"include": "*"} if order == "after" else {}))
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()
                  if not p.requires_grad}
        steps = _train(model, steps=3, optimizer=optimizer)
        for name, p in model.named_parameters():
            if not p.requires_grad:  # no step, and no gradient computed for nothing
                assert torch.equal(p, frozen[name]) and p.grad is None, name
        assert all(math.isfinite(step["loss"]) for step in steps)
        return steps

    assert_steps_alike(*on_both_backends(run))


def test_gradient_checkpointing_gives_the_same_steps():
    """peft needs the input embeddings to require grad for checkpointing; with that alone the
    steps must be the same (without it layer 0's frozen layers run no backward at all, so their
    memory stays empty while the trained weights' gradients are the same)."""
    plain = _lora("before")
    plain.enable_input_require_grads()
    checkpointed = _lora("before")
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5
        checkpointed.activation_checkpointing_enable()
    else:
        checkpointed.gradient_checkpointing_enable()
    checkpointed.enable_input_require_grads()
    for want, got in zip(_train(plain), _train(checkpointed), strict=True):
        assert want.keys() == got.keys()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("order", ORDERS)
def test_evaluation_merging_and_densify_are_the_dense_model(order):
    model = _lora(order)
    _train(model, steps=1)
    model.eval()
    batch = _batch(5)
    with torch.no_grad():
        want = model(**batch).logits
        base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        weight = base.weight.clone()
        merged = model.merge_and_unload()
        assert not torch.equal(weight, merged.model.layers[0].self_attn.q_proj.weight)
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-12, atol=1e-12)
        dense = msbp.densify(merged)
        assert not any(isinstance(m, msbp.SparseLinear) for m in dense.modules())
        torch.testing.assert_close(dense(**batch).logits, want, rtol=1e-12, atol=1e-12)


def test_after_leaves_the_adapters_dense_unless_included():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _lora("after").sparsify_report
    assert not [w for w in caught if "sparsify left" in str(w.message)]  # a choice: no warning
    adapters = {n: why for n, why in report.dense.items() if ".lora_" in n}
    assert len(adapters) == 2 * len(TARGETS) and set(adapters.values()) == {LORA_ADAPTER}
    assert not any("lora_" in n for n in report.converted)
    assert {n for n in report.converted if n.endswith("base_layer")} == {
        f"base_model.model.model.layers.0.{p}.base_layer"
        for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    names = _lora("after", include="*").sparsify_report.converted
    assert any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)


def test_adapter_saved_by_peft_reloads_on_a_dense_base(tmp_path):
    model = _lora("before")
    _train(model, steps=1)
    model.eval()
    with torch.no_grad():
        want = model(**_batch(5)).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_batch(5)).logits, want, rtol=1e-12, atol=1e-12)


def test_densify_of_a_peft_model_removes_the_record():
    """A stale record would go into config.json with the merged model (plain from_pretrained +
    sparsify then warns of memories that never were; msbp.from_pretrained asks for them)."""
    model = _lora("before")
    assert "msbp" in model.get_base_model().config.to_dict()
    msbp.densify(model)
    assert "msbp" not in model.get_base_model().config.to_dict()


def test_msbp_save_pretrained_of_a_peft_model_says_what_to_save(tmp_path):
    with pytest.raises(ValueError, match="merge_and_unload"):
        msbp.save_pretrained(_lora("after"), tmp_path)


def test_merged_model_saved_plainly_loads_with_msbp_from_pretrained(tmp_path):
    """Sparsified inside the PeftModel, its layers were recorded as ``...q_proj.base_layer``;
    merge_and_unload puts them at ``...q_proj``, and a plain save_pretrained (HF Trainer's)
    keeps the record as it was."""
    model = _lora("after")
    _train(model, steps=1)
    merged = model.merge_and_unload()
    memories = msbp.memory_state_dict(merged)
    assert memories and not any("base_layer" in key for key in memories)
    merged.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = msbp.from_pretrained(type(merged), tmp_path)
    assert sorted(loaded.sparsify_report.converted) == sorted(
        key.removesuffix(".memory") for key in memories
    )
    got = msbp.memory_state_dict(loaded)
    assert got.keys() == memories.keys()
    for key, value in memories.items():
        assert torch.equal(got[key], value), key
