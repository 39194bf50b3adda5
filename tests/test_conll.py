"""CoNLL-U / CoNLL-X / CoNLL-2000 readers: parsing, skipped lines, errors, projectivity."""

from __future__ import annotations

import argparse
import gzip
import zipfile
from pathlib import Path

import pytest
from conllx_fixtures import DEV, MULTI_ROOT, TEST, TRAIN, write_treebank

from msbp.data.conll import (
    Sentence,
    Token,
    choose_tag_column,
    is_projective,
    is_punct_form,
    is_tree,
    read_conll,
    read_conll2000,
)
from msbp.tasks.pos import PosTask

CONLLU = """\
# sent_id = 1
# text = I can't go.
1	I	I	PRON	PRP	_	4	nsubj	_	_
2-3	can't	_	_	_	_	_	_	_	_
2	ca	can	AUX	MD	_	4	aux	_	_
3	n't	not	PART	RB	_	4	advmod	_	_
4	go	go	VERB	VB	_	0	root	_	_
4.1	went	go	VERB	VBD	_	_	_	4:conj	_
5	.	.	PUNCT	.	_	4	punct	_	_

1	Hello	hello	INTJ	UH	_	0	root	_	_

"""

CONLLX = """\
1	The	the	DT	DT	_	2	NMOD	_	_
2	dog	dog	NN	NN	_	3	SBJ	_	_
3	barks	bark	VB	VBZ	_	0	ROOT	_	_
"""  # no trailing blank line: the last sentence still counts


def _write(tmp_path: Path, name: str, text: str, gz: bool) -> Path:
    path = tmp_path / name
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_conllu_reader_skips_comments_multiword_and_empty_nodes(tmp_path: Path, gz: bool) -> None:
    # the file name says nothing about compression: detection is by content
    sents = read_conll(_write(tmp_path, "x.conllu", CONLLU, gz))
    assert [len(s) for s in sents] == [5, 1]
    first = sents[0]
    assert [t.form for t in first] == ["I", "ca", "n't", "go", "."]
    assert [t.head for t in first] == [4, 4, 4, 0, 4]
    assert first[1].lemma == "can" and first[1].upos == "AUX" and first[1].xpos == "MD"
    assert first[4].deprel == "punct" and first[4].is_punct and not first[0].is_punct


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_conllx_reader(tmp_path: Path, gz: bool) -> None:
    sents = read_conll(_write(tmp_path, "x.conll", CONLLX, gz))
    assert len(sents) == 1
    assert [(t.xpos, t.head, t.deprel) for t in sents[0]] == [
        ("DT", 2, "NMOD"), ("NN", 3, "SBJ"), ("VBZ", 0, "ROOT"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2\tdog\tdog\tNN\tNN\t_\t3\tSBJ\t_", "expected 10 tab-separated columns, got 9"),
        ("2\tdog\tdog\tNN\tNN\t_\tx\tSBJ\t_\t_", "HEAD 'x' is not an integer"),
        ("two\tdog\tdog\tNN\tNN\t_\t3\tSBJ\t_\t_", "ID 'two' is not an integer"),
        ("2\tdog dog\tNN\tNN\t_\t3\tSBJ\t_\t_", "expected 10 tab-separated columns"),
    ],
)
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_malformed_line_names_file_and_line(
    tmp_path: Path, line: str, message: str, gz: bool
) -> None:
    lines = CONLLX.splitlines()
    lines[1] = line
    path = _write(tmp_path, "bad.conll.gz" if gz else "bad.conll", "\n".join(lines) + "\n", gz)
    with pytest.raises(ValueError, match=rf"{path.name}:2: .*{message}"):
        read_conll(path)


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ("2 3 5", "HEAD 5 > sentence length 3"),
        ("2 3 1", "cycle"),
    ],
)
def test_bad_trees_are_rejected(tmp_path: Path, heads: str, message: str) -> None:
    rows = [
        f"{i}\tw{i}\tw\tX\tX\t_\t{h}\tdep\t_\t_" for i, h in enumerate(heads.split(), start=1)
    ]
    path = _write(tmp_path, "t.conllu", "# c\n" + "\n".join(rows) + "\n\n", False)
    with pytest.raises(ValueError, match=rf"t.conllu:2: .*{message}"):
        read_conll(path)


def test_ids_out_of_order(tmp_path: Path) -> None:
    text = CONLLX.replace("2\tdog", "7\tdog")
    with pytest.raises(ValueError, match=r"x.conll:1: token IDs must run"):
        read_conll(_write(tmp_path, "x.conll", text, False))


def test_projectivity() -> None:
    assert is_projective([2, 0, 2])  # a <- b -> c
    assert is_projective([0])
    assert not is_projective([3, 4, 0, 3])  # 1<-3 crosses 2<-4
    assert not is_projective([0, 4, 1, 1])  # arc 1->3 covers 2, whose head 4 is outside
    assert is_tree([2, 0, 2]) and not is_tree([2, 1])


def test_real_ud_sample_counts() -> None:
    path = Path(__file__).resolve().parents[2] / "shared/data/ud_en_ewt/dev.conllu.gz"
    if not path.exists():
        pytest.skip("../shared/data not present")
    sents = read_conll(path)
    assert len(sents) == 2001
    assert sum(not is_projective([t.head for t in s]) for s in sents) == 31


def test_conll2000_reader(tmp_path: Path) -> None:
    path = tmp_path / "conll2000.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("conll2000/train.txt", "He PRP B-NP\nran VBD B-VP\n. . O\n\nOk UH O\n")
        z.writestr("conll2000/test.txt", "bad line\n")
    assert read_conll2000(path) == [[("He", "PRP"), ("ran", "VBD"), (".", ".")], [("Ok", "UH")]]
    with pytest.raises(ValueError, match=r"conll2000.zip/conll2000/test.txt:1: "):
        read_conll2000(path, "test.txt")
    with pytest.raises(ValueError, match="no member"):
        read_conll2000(path, "dev.txt")


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_bom_and_crlf_are_accepted(tmp_path: Path, gz: bool) -> None:
    text = "\ufeff" + CONLLX.replace("\n", "\r\n") + "\r\n" + CONLLX.replace("\n", "\r\n")
    sents = read_conll(_write(tmp_path, "bom.conll", text, gz))
    assert len(sents) == 2
    for sent in sents:
        assert [t.id for t in sent] == [1, 2, 3]
        assert [(t.form, t.xpos, t.deprel) for t in sent] == [
            ("The", "DT", "NMOD"), ("dog", "NN", "SBJ"), ("barks", "VBZ", "ROOT"),
        ]  # no "\r" left in the last column, no BOM in the first


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_invalid_utf8_names_file_and_line(tmp_path: Path, gz: bool) -> None:
    lines = CONLLX.encode("utf-8").splitlines(keepends=True)
    lines[2] = lines[2].replace(b"barks", "bark\u0161".encode("iso-8859-2"))  # a Latin-2 byte
    data = b"".join(lines)
    path = tmp_path / "latin2.conll"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=r"latin2.conll:3: not valid UTF-8") as info:
        read_conll(path)
    assert not isinstance(info.value, UnicodeDecodeError)


def test_truncated_gzip_is_a_value_error(tmp_path: Path) -> None:
    data = gzip.compress(((CONLLX + "\n") * 200).encode("utf-8"))
    path = tmp_path / "cut.conll.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.conll.gz:\d+: damaged gzip data"):
        read_conll(path)


@pytest.mark.parametrize(
    ("form", "punct"),
    [(".", True), ("«", True), ("»", True), ("¿", True), ("—", True), ("...", True),
     ("?!", True), ("+", False), ("€", False), ("a.", False), ("1", False), ("Kočka", False)],
)
def test_punctuation_by_form(tmp_path: Path, form: str, punct: bool) -> None:
    # tags of a non-PTB, non-UD tag set: only the form can make the token punctuation
    row = f"1\t{form}\t{form}\tP\tPunc\t_\t0\tROOT\t_\t_\n"
    (tok,) = read_conll(_write(tmp_path, "p.conll", row, False))[0]
    assert tok.is_punct is punct
    assert is_punct_form(form) is punct


def test_punctuation_by_tags_still_counts() -> None:
    assert Token(1, "-LRB-", "(", "X", "-LRB-", 0, "dep").is_punct
    assert Token(1, "--", "--", "PUNCT", "HYPH", 0, "punct").is_punct
    assert Token(1, "$", "$", "SYM", "$", 0, "dep").is_punct  # a symbol, but a PTB punct tag
    assert not Token(1, "$", "$", "SYM", "Sc", 0, "dep").is_punct


def test_multi_rooted_tree_is_read(tmp_path: Path) -> None:
    path = write_treebank(tmp_path / "mr.conll", [TRAIN[MULTI_ROOT[0]]])
    (sent,) = read_conll(path)
    assert [t.head for t in sent].count(0) == 2


def _columns_file(tmp_path: Path, name: str, **columns: bool) -> list[Sentence]:
    return read_conll(write_treebank(tmp_path / name, TRAIN * 40, **columns))


def test_choose_tag_column(tmp_path: Path) -> None:
    both = _columns_file(tmp_path, "both.conll")
    assert choose_tag_column(both, "xpos") == ("xpos", "")
    assert choose_tag_column(both, "upos") == ("upos", "")
    no_xpos = _columns_file(tmp_path, "no_xpos.conll", xpos=False)
    column, note = choose_tag_column(no_xpos, "xpos")
    assert column == "upos" and "XPOS/POSTAG is '_' for 100%" in note and "UPOS/CPOSTAG" in note
    no_upos = _columns_file(tmp_path, "no_upos.conll", upos=False)
    assert choose_tag_column(no_upos, "upos")[0] == "xpos"
    assert choose_tag_column(no_upos, "xpos") == ("xpos", "")
    neither = _columns_file(tmp_path, "neither.conll", xpos=False, upos=False)
    column, note = choose_tag_column(neither, "xpos")
    assert column == "xpos" and "both '_'" in note
    # "nearly every" token: one tagged sentence among 240 blank ones does not make a tag set
    one_tagged = [_columns_file(tmp_path, "one.conll")[0], *no_xpos]
    assert choose_tag_column(one_tagged, "xpos")[0] == "upos"
    with pytest.raises(ValueError, match="tag column"):
        choose_tag_column(both, "feats")


def test_pos_task_falls_back_to_upos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split, sents in (("train", TRAIN), ("dev", DEV), ("test", TEST)):
        write_treebank(tmp_path / f"xx-{split}.conllu", sents, xpos=False)
    task = PosTask(argparse.Namespace(pos_data="ud", data_dir=str(tmp_path), batch_size=4))
    assert "_" not in task.vocab.tags
    assert set(task.vocab.tags) == {item.split("/")[1][0] for s in TRAIN for item in s.split()}
    assert "using UPOS/CPOSTAG tags instead" in capsys.readouterr().err
    # with XPOS present the tagger keeps it
    for split, sents in (("train", TRAIN), ("dev", DEV), ("test", TEST)):
        write_treebank(tmp_path / f"xx-{split}.conllu", sents)
    task = PosTask(argparse.Namespace(pos_data="ud", data_dir=str(tmp_path), batch_size=4))
    assert "Punc" in task.vocab.tags
    assert "instead" not in capsys.readouterr().err
