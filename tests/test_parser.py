"""Arc-standard parser: oracle round trip, the 48 features, legal decoding, a tiny training run."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest
import torch
from conllx_fixtures import (
    DEV,
    MULTI_ROOT,
    NON_PROJECTIVE,
    TEST,
    TRAIN,
    punct_counts,
    treebank_lines,
    write_treebank,
)

from msbp import SparseBackpropConfig, SparseLinear, sparsify
from msbp.data.conll import Token, is_projective
from msbp.data.errors import DataError
from msbp.tasks.parse import (
    N_FEATS,
    NULL,
    SHIFT,
    ParserMLP,
    ParseTask,
    State,
    Vocab,
    attachment_scores,
    cube,
    features,
    oracle_transitions,
    parse,
)

CONLLU = """\
1	The	the	DET	DT	_	2	det	_	_
2	dog	dog	NOUN	NN	_	3	nsubj	_	_
3	chased	chase	VERB	VBD	_	0	root	_	_
4	a	a	DET	DT	_	5	det	_	_
5	cat	cat	NOUN	NN	_	3	obj	_	_
6	in	in	ADP	IN	_	8	case	_	_
7	the	the	DET	DT	_	8	det	_	_
8	garden	garden	NOUN	NN	_	3	obl	_	_
9	.	.	PUNCT	.	_	3	punct	_	_

1	Dogs	dog	NOUN	NNS	_	2	nsubj	_	_
2	bark	bark	VERB	VBP	_	0	root	_	_
3	!	!	PUNCT	.	_	2	punct	_	_

"""



def _random_projective_heads(n: int, rng: random.Random) -> list[int]:
    """A random projective tree over 1..n with one root: recursive splitting of spans."""
    heads = [0] * n

    def build(lo: int, hi: int, head: int) -> None:  # attach tokens lo..hi to a subtree of head
        if lo > hi:
            return
        r = rng.randint(lo, hi)
        heads[r - 1] = head
        build(lo, r - 1, r)
        build(r + 1, hi, r)

    build(1, n, 0)
    return heads


def test_oracle_reproduces_random_projective_trees() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 25)
        heads = _random_projective_heads(n, rng)
        assert is_projective(heads)
        labels = [rng.randrange(3) for _ in range(n)]
        seq = oracle_transitions(heads, labels, num_labels=3)
        assert seq is not None and len(seq) == 2 * n
        state = State(n)
        for t in seq:
            state.apply(t, 3)
        assert state.terminal()
        assert state.head[1:] == heads and state.label[1:] == labels


def test_oracle_rejects_non_projective_and_multi_root() -> None:
    assert oracle_transitions([3, 4, 0, 3], [0, 0, 0, 0], 1) is None
    assert oracle_transitions([0, 0], [0, 0], 1) is None
    assert oracle_transitions([3, 4, 0, 3], [0, 0, 0, 0], 1, multi_root=True) is None


def test_multi_root_oracle_rebuilds_forests_and_keeps_single_rooted_sequences() -> None:
    rng = random.Random(1)
    for _ in range(300):
        # a forest: several projective trees side by side, each attached to the root
        heads: list[int] = []
        for _ in range(rng.randint(1, 4)):
            part = _random_projective_heads(rng.randint(1, 8), rng)
            off = len(heads)
            heads += [h + off if h else 0 for h in part]
        labels = [rng.randrange(3) for _ in heads]
        seq = oracle_transitions(heads, labels, 3, multi_root=True)
        assert seq is not None and len(seq) == 2 * len(heads)
        state = State(len(heads), multi_root=True)
        for t in seq:
            assert state.legal()[0 if t == SHIFT else (1 if t <= 3 else 2)]
            state.apply(t, 3)
        assert state.terminal() and state.head[1:] == heads and state.label[1:] == labels
        if heads.count(0) == 1:
            assert seq == oracle_transitions(heads, labels, 3)
        else:
            assert oracle_transitions(heads, labels, 3) is None


def test_decoding_without_multi_root_gives_one_root_and_with_it_may_give_more() -> None:
    state = State(3)
    state.apply(SHIFT, 1)
    assert state.legal() == (True, False, False)  # the root waits for the end
    multi = State(3, multi_root=True)
    multi.apply(SHIFT, 1)
    assert multi.legal() == (True, False, True)


def test_children_order_and_features() -> None:
    heads = [2, 0, 2, 5, 3]  # 1 <- 2 -> 3 -> 5 -> 4
    state = State(5)
    for t in oracle_transitions(heads, [0] * 5, 1)[:5]:
        state.apply(t, 1)
    words = list(range(10, 16))
    tags = list(range(20, 26))
    feats = features(state, words, tags)
    assert len(feats) == N_FEATS == 48
    # after shift, shift, left, shift, shift: stack [0, 2, 3, 4], buffer [5]
    assert state.stack == [0, 2, 3, 4] and state.i == 5
    assert feats[:6] == [14, 13, 12, 15, NULL, NULL]
    assert feats[18:24] == [24, 23, 22, 25, NULL, NULL]
    assert feats[6 + 6 : 6 + 12] == [NULL] * 6  # s2 = token 3 has no children yet
    state2 = State(3)
    for t in oracle_transitions([3, 3, 0], [0, 1, 0], 2)[:4]:  # shift shift shift left(1)
        state2.apply(t, 2)
    f2 = features(state2, [9, 10, 11, 12], [9, 20, 21, 22])
    assert state2.stack == [0, 1, 3]
    assert f2[6] == 11  # lc1(s1) is token 2, the word id of token 2 is 11
    assert f2[36] == 1 + 1  # its label (1), shifted past NULL


def _task(tmp_path: Path, **extra) -> ParseTask:
    path = tmp_path / "toy.conllu"
    path.write_text(CONLLU * 3, encoding="utf-8")
    args = argparse.Namespace(
        train_path=str(path), dev_path=str(path), test_path=str(path),
        hidden_size=32, embedding_dim=8, activation="cube", dropout=0.0,
        **{"batch_size": 8, **extra},
    )
    return ParseTask(args)


def test_tiny_training_run_learns_and_decodes_legally(tmp_path: Path) -> None:
    task = _task(tmp_path, batch_size=24)
    assert task.features.shape == (3 * 24, 48)
    torch.manual_seed(0)
    model = sparsify(task.build_model(), SparseBackpropConfig(ratio=0.25),
                     exclude=task.sparse_exclude())
    assert isinstance(model.hidden, SparseLinear) and not isinstance(model.output, SparseLinear)
    # lr 2e-2 made the cube net oscillate at the end: it passed or failed with the CPU's SIMD width
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(40):
        for batch in task.train_batches(epoch, torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
    scores = task.evaluate(model, "dev")
    assert set(scores) == {"uas", "las", "uas_all", "las_all"}
    assert scores["uas_all"] > 90.0
    for heads, _ in parse(model, task.splits["dev"], task.vocab):
        assert sorted(heads).count(0) == 1  # a single root: decoding used legal moves only


def test_untrained_decoding_gives_trees(tmp_path: Path) -> None:
    task = _task(tmp_path)
    torch.manual_seed(1)
    model = task.build_model()
    for sent, (heads, _) in zip(task.splits["dev"], parse(model, task.splits["dev"], task.vocab),
                                strict=True):
        assert len(heads) == len(sent) and heads.count(0) == 1 and min(heads) >= 0


def test_attachment_scores_punctuation() -> None:
    sent = [Token(1, "Hi", "hi", "INTJ", "UH", 0, "root"), Token(2, "!", "!", "PUNCT", ".", 1,
                                                                  "punct")]
    vocab = Vocab([sent])
    wrong_punct = [([0, 0], [vocab.labels["root"], vocab.labels["punct"]])]
    s = attachment_scores([sent], wrong_punct, vocab)
    assert s["uas"] == 100.0 and s["uas_all"] == 50.0 and s["las_all"] == 50.0


@pytest.mark.parametrize("activation", ["relu"])
def test_activation_option(tmp_path: Path, activation: str) -> None:
    task = _task(tmp_path)
    task.args.activation = activation
    model = task.build_model()
    assert model.activation == activation
    assert model(task.features[:4]).shape == (4, 2 * task.vocab.num_labels + 1)


# ----------------------------------------------------------------------------- other treebanks

REPEAT = 3  # copies of the fixture's training trees


def _conllx_task(
    tmp_path: Path, train: list[str] | None = None, roots: str = "auto", **columns: bool
) -> ParseTask:
    paths = {
        "train": write_treebank(tmp_path / "xx_train.conll", (train or TRAIN) * REPEAT, bom=True,
                                crlf=True, **columns),
        "dev": write_treebank(tmp_path / "xx_dev.conll", DEV, **columns),
        "test": write_treebank(tmp_path / "xx_test.conll", TEST, **columns),
    }
    args = argparse.Namespace(
        **{f"{split}_path": str(p) for split, p in paths.items()},
        hidden_size=16, embedding_dim=8, activation="cube", dropout=0.0, batch_size=16,
        roots=roots,
    )
    return ParseTask(args)


@pytest.mark.parametrize("roots", ["auto", "multiple", "single"])
def test_multi_rooted_training_trees_used_unless_single(tmp_path: Path, capsys, roots: str) -> None:
    task = _conllx_task(tmp_path, roots=roots)
    err = capsys.readouterr().err
    used_multi = roots != "single"
    assert task.multi_root == used_multi
    assert task.counts == {
        "used": (len(TRAIN) - len(NON_PROJECTIVE) - (not used_multi) * len(MULTI_ROOT)) * REPEAT,
        "non_projective": len(NON_PROJECTIVE) * REPEAT,
        "underivable": (not used_multi) * len(MULTI_ROOT) * REPEAT,
    }
    assert f"{len(MULTI_ROOT) * REPEAT} training trees have several roots" in err
    assert ("root takes several children" in err) == used_multi


def test_auto_roots_stay_single_without_multi_rooted_training_trees(tmp_path: Path) -> None:
    task = _conllx_task(tmp_path, train=[t for i, t in enumerate(TRAIN) if i not in MULTI_ROOT])
    assert not task.multi_root


def test_conllx_treebank_multi_root_and_unseen_labels(tmp_path: Path, capsys) -> None:
    task = _conllx_task(tmp_path, roots="single")
    err = capsys.readouterr().err
    assert f"{len(MULTI_ROOT) * REPEAT} training trees have several roots" in err
    assert "tags (xpos)" in err and "instead" not in err
    assert "ADV" not in task.vocab.labels and "Adv" not in task.vocab.tags
    # every dev tree is kept, the two-rooted one included, and parsed into a one-rooted tree
    dev = task.splits["dev"]
    assert len(dev) == len(DEV) and sum(t.head == 0 for t in dev[2]) == 2
    torch.manual_seed(0)
    model = task.build_model()
    predicted = parse(model, dev, task.vocab)
    assert [len(h) for h, _ in predicted] == [len(s) for s in dev]
    assert all(h.count(0) == 1 for h, _ in predicted)
    for split in ("dev", "test"):
        assert all(0.0 <= v <= 100.0 for v in task.evaluate(model, split).values())
    # gold heads and labels, where the label is known: an unseen label is an error, not a crash
    root = task.vocab.labels["ROOT"]
    gold = [([t.head for t in s], [task.vocab.labels.get(t.deprel, root) for t in s]) for s in dev]
    scores = attachment_scores(dev, gold, task.vocab)
    n_all, n_words = punct_counts(DEV)
    assert scores["uas"] == scores["uas_all"] == 100.0
    assert scores["las"] == pytest.approx(100.0 * (n_words - 1) / n_words)  # rychle/ADV
    assert scores["las_all"] == pytest.approx(100.0 * (n_all - 1) / n_all)


def test_punctuation_by_form_in_scores(tmp_path: Path) -> None:
    task = _conllx_task(tmp_path)
    dev = task.splits["dev"]
    # heads all wrong on punctuation ("Punc" tags: only the form tells) and right elsewhere
    wrong = [
        ([(t.head + 1) % (len(s) + 1) if t.form in ".«»?" else t.head for t in s],
         [0] * len(s))
        for s in dev
    ]
    scores = attachment_scores(dev, wrong, task.vocab)
    n_all, n_words = punct_counts(DEV)
    assert scores["uas"] == 100.0
    assert scores["uas_all"] == pytest.approx(100.0 * n_words / n_all)


@pytest.mark.parametrize(
    ("columns", "used", "tags", "note"),
    [
        ({"xpos": False}, "upos", {"N", "V", "A", "P"},
         "XPOS/POSTAG is '_' for 100% of training tokens, using UPOS/CPOSTAG tags instead"),
        ({"upos": False}, "xpos", {"N", "V", "A", "Punc"}, None),
        ({"xpos": False, "upos": False}, "xpos", {"_"}, "both '_'"),
    ],
    ids=["no-xpos", "no-upos", "no-tags"],
)
def test_tag_column_fallback(
    tmp_path: Path, capsys, columns: dict, used: str, tags: set[str], note: str | None
) -> None:
    task = _conllx_task(tmp_path, **columns)
    err = capsys.readouterr().err
    assert task.vocab.tag_column == used and set(task.vocab.tags) == tags
    assert f"tags ({used})" in err and err.count("\n") == 1  # one summary line
    if note is None:
        assert "instead" not in err and "both" not in err
    else:
        assert note in err
    assert len(task.targets) > 0


def test_no_derivable_training_tree_is_a_data_error(tmp_path: Path) -> None:
    only_bad = [TRAIN[i] for i in NON_PROJECTIVE + MULTI_ROOT]
    with pytest.raises(DataError, match=r"xx_train.conll: none of its 6 training trees"):
        _conllx_task(tmp_path, train=only_bad, roots="single")


def test_empty_treebank_is_a_data_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.conll"
    empty.write_text("\n\n", encoding="utf-8")
    args = argparse.Namespace(train_path=str(empty), dev_path=str(empty), test_path=str(empty))
    with pytest.raises(DataError, match=r"empty.conll: no sentences"):
        ParseTask(args)


def test_reader_error_names_full_path_and_line(tmp_path: Path) -> None:
    path = write_treebank(tmp_path / "xx_train.conll", TRAIN)
    path.write_bytes(path.read_bytes().replace("Starý".encode(), "Starý".encode("cp1250")))
    line = next(i for i, text in enumerate(treebank_lines(TRAIN), 1) if "Starý" in text)
    args = argparse.Namespace(train_path=str(path), dev_path=str(path), test_path=str(path))
    with pytest.raises(DataError) as info:
        ParseTask(args)
    assert str(info.value).startswith(f"{path}:{line}: not valid UTF-8")


def test_stacked_lookup_equals_three_tables() -> None:
    """The one lookup in the stacked tables reads words, tags and labels from their own tables."""
    torch.manual_seed(0)
    model = ParserMLP(7, 5, 3, embedding_dim=4, hidden_size=6, activation="cube")
    # tags 3 and 4 never occur: their rows must get no gradient
    feats = torch.cat((torch.randint(0, 7, (9, 18)), torch.randint(0, 3, (9, 18)),
                       torch.randint(0, 4, (9, 12))), dim=1)
    x = torch.cat((model.word_embedding(feats[:, :18]), model.tag_embedding(feats[:, 18:36]),
                   model.label_embedding(feats[:, 36:])), dim=1).flatten(1)
    expected = model.output(model.hidden(x) ** 3)
    torch.testing.assert_close(model(feats), expected)
    model(feats).sum().backward()
    assert model.label_embedding.weight.grad[feats[:, 36:].unique()].abs().sum() > 0
    assert not model.tag_embedding.weight.grad[3:].any()
    assert model.tag_embedding.weight.grad[:3].abs().sum(1).gt(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cube_gives_pows_values_and_gradient_bit_for_bit(dtype) -> None:
    """The parser's cube (one buffer in its backward) equals ``h.pow(3)`` and its autograd
    gradient exactly, so results made with ``pow`` reproduce; the model uses it."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 23, generator=gen).to(dtype)
    g = torch.randn(37, 23, generator=gen).to(dtype)
    a = h.clone().requires_grad_(True)
    a.pow(3).backward(g)
    b = h.clone().requires_grad_(True)
    y = cube(b)
    y.backward(g)
    assert torch.equal(y, h.pow(3))
    assert torch.equal(b.grad, a.grad)
    model = ParserMLP(7, 5, 3, embedding_dim=4, hidden_size=6, activation="cube")
    seen = []
    model.output.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].grad_fn))
    model(torch.randint(0, 3, (4, N_FEATS), generator=gen))
    assert type(seen[0]).__name__ == "_CubeBackward"
