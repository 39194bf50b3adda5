"""POS task: word shapes, the conll2000 split, a tiny training run with a sparse LSTM."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import torch

from msbp import SparseBackpropConfig, SparseLSTM, sparsify
from msbp.tasks.pos import CONLL2000_DEV, PosTask, word_shape


def test_word_shape_distinguishes_case_digits_hyphens() -> None:
    shapes = {w: word_shape(w) for w in ["dog", "Dog", "DOG", "iPod", "1984", "well-known",
                                         "F-16", ","]}
    assert len(set(shapes.values())) == len(shapes)
    assert all(2 <= s < 22 for s in shapes.values())


def _zip(tmp_path: Path, n_train: int) -> Path:
    sent = "The DT B-NP\ndog NN I-NP\nBarks VBZ B-VP\n. . O\n\n"
    other = "A DT B-NP\ncat NN I-NP\nsleeps VBZ B-VP\n. . O\n\n"
    path = tmp_path / "conll2000.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("conll2000/train.txt", (sent + other) * (n_train // 2))
        z.writestr("conll2000/test.txt", other * 3)
    return path


def test_conll2000_split_and_tiny_sparse_training(tmp_path: Path) -> None:
    _zip(tmp_path, CONLL2000_DEV + 40)
    args = argparse.Namespace(pos_data="conll2000", data_dir=str(tmp_path), batch_size=8,
                              hidden_size=16, word_dim=8, suffix_dim=4, bucket=2)
    task = PosTask(args)
    assert [len(task.data[s]) for s in ("train", "dev", "test")] == [40, CONLL2000_DEV, 3]
    torch.manual_seed(0)
    model = sparsify(task.build_model(), SparseBackpropConfig(k=5), exclude=task.sparse_exclude())
    assert isinstance(model.lstm, SparseLSTM)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for epoch in range(6):
        for batch in task.train_batches(epoch, torch.Generator().manual_seed(epoch)):
            feats, tags = batch
            assert feats.shape[:2] == tags.shape and feats.shape[2] == 4
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
    assert task.evaluate(model, "test")["accuracy"] == 100.0


def test_cli_compare_on_conllx_files_and_bad_combination(tmp_path: Path, capsys) -> None:
    import json

    from conllx_fixtures import DEV, TEST, TRAIN, write_treebank

    from msbp.cli import main

    paths = [str(write_treebank(tmp_path / f"xx_{split}.conll", sents))
             for split, sents in (("train", TRAIN * 4), ("dev", DEV), ("test", TEST))]
    out = tmp_path / "pos.json"
    argv = ["compare", "--task", "pos", "--train", paths[0], "--dev", paths[1], "--test",
            paths[2], "--epochs", "2", "--batch-size", "4", "--hidden-size", "8", "--word-dim",
            "8", "--suffix-dim", "4", "--k", "3", "--threads", "1", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["dense", "sbp", "msbp"]
    assert all(0.0 <= r["test_accuracy"] <= 100.0 for r in runs)
    capsys.readouterr()
    assert main([*argv[:3], "--pos-data", "conll2000", *argv[3:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not combine with --pos-data conll2000" in err[0]
