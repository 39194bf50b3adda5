"""msbp under the transformers ``Trainer``: a sparsified model trains and, interrupted after a
checkpoint and resumed with ``resume_from_checkpoint``, ends bit for bit where the uninterrupted
run ends (weights, memories: they travel in ``model.safetensors``), with torch's AdamW
(``optim="adamw_torch"`` / ``"adamw_torch_fused"``) or ``LazyRowAdamW`` passed as the optimizer.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import msbp

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's own dependency

STEPS, STOP = 6, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0, max_position_embeddings=16, num_labels=3,
    )
    model = transformers.DistilBertForSequenceClassification(config)
    msbp.sparsify(model, msbp.SparseBackpropConfig(ratio=0.25, memory=0.8), exclude="classifier")
    return model


def _data() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 50, (8,), generator=gen),
             "labels": int(torch.randint(0, 3, (1,), generator=gen))} for _ in range(48)]


class _StopAt(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == STOP:
            control.should_training_stop = True


def _train(model, out, optim: str, resume=None, stop: bool = False) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, save_steps=STOP,
        report_to=[], use_cpu=True, seed=0, data_seed=0, logging_steps=100,
        disable_tqdm=True, optim="adamw_torch" if optim == "lazy" else optim,
    )
    optimizers = (None, None)
    if optim == "lazy":
        optimizers = (msbp.optim.LazyRowAdamW(model.parameters(), lr=5e-5, weight_decay=0.01),
                      None)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_data(), optimizers=optimizers,
        callbacks=[_StopAt()] if stop else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "lazy"])
def test_trainer_resumes_bit_for_bit(tmp_path, optim):
    transformers.logging.set_verbosity_error()
    whole = _model()
    _train(whole, tmp_path / "whole", optim)
    _train(_model(), tmp_path / "parts", optim, stop=True)
    resumed = _model()
    _train(resumed, tmp_path / "parts", optim, resume=str(
        tmp_path / "parts" / f"checkpoint-{STOP}"))
    want, got = whole.state_dict(), resumed.state_dict()
    memories = [key for key in want if key.endswith("memory")]
    assert len(memories) == 13 and all(want[key].any() for key in memories)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(want["distilbert.transformer.layer.0.ffn.lin1.weight"],
                           _model().state_dict()["distilbert.transformer.layer.0.ffn.lin1.weight"])
