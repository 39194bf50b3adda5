"""A tiny non-English CoNLL-X treebank with its own tags and labels, written to real files.

A sentence is written compactly as ``"form/TAG/head/LABEL ..."``; CPOSTAG is the tag's first
letter, POSTAG the tag, LEMMA the lowercased form, FEATS, PHEAD and PDEPREL ``_``.
"""

from __future__ import annotations

from pathlib import Path

TRAIN = [
    "Kočka/N/2/SUBJ žere/V/0/ROOT myš/N/2/OBJ ./Punc/2/PUNC",
    "Starý/A/2/ATR pes/N/3/SUBJ spí/V/0/ROOT ./Punc/3/PUNC",
    "Pes/N/2/SUBJ vidí/V/0/ROOT malou/A/4/ATR kočku/N/2/OBJ ,/Punc/2/PUNC",
    "Myš/N/2/SUBJ spí/V/0/ROOT «/Punc/2/PUNC ./Punc/2/PUNC",
    # non-projective: the arc psa <- starého spans vidí, whose head (the root) lies outside
    "Psa/N/2/OBJ vidí/V/0/ROOT kočka/N/2/SUBJ starého/A/1/ATR ./Punc/2/PUNC",
    # two roots, as treebanks that attach final punctuation to the root have
    "Pes/N/2/SUBJ žere/V/0/ROOT ./Punc/0/PUNC",
]
NON_PROJECTIVE, MULTI_ROOT = [4], [5]  # indices into TRAIN

# punctuation is tagged "Punc" (neither a PTB tag nor UPOS PUNCT): only its form marks it;
# "rychle/Adv/ADV" has a tag and a label never seen in training; the third tree has two roots
DEV = [
    "Malý/A/2/ATR pes/N/3/SUBJ žere/V/0/ROOT ./Punc/3/PUNC",
    "«/Punc/3/PUNC Kočka/N/3/SUBJ spí/V/0/ROOT »/Punc/3/PUNC ./Punc/3/PUNC",
    "Pes/N/3/SUBJ rychle/Adv/3/ADV běží/V/0/ROOT ./Punc/0/PUNC",
    "Kočka/N/2/SUBJ vidí/V/0/ROOT psa/N/2/OBJ ?/Punc/2/PUNC",
]
TEST = [
    "Malá/A/2/ATR myš/N/3/SUBJ vidí/V/0/ROOT psa/N/3/OBJ ./Punc/3/PUNC",
    "Pes/N/2/SUBJ spí/V/0/ROOT ¿/Punc/2/PUNC",
]


def rows(sentence: str, xpos: bool = True, upos: bool = True) -> list[str]:
    """The 10-column token lines of a compact sentence; a tag column is ``_`` if switched off."""
    out = []
    for i, item in enumerate(sentence.split(), start=1):
        form, tag, head, label = item.split("/")
        cpos = tag[0] if upos else "_"
        pos = tag if xpos else "_"
        out.append(f"{i}\t{form}\t{form.lower()}\t{cpos}\t{pos}\t_\t{head}\t{label}\t_\t_")
    return out


def treebank_lines(sentences: list[str], **columns: bool) -> list[str]:
    """All lines of a treebank file (a blank line after each sentence), without line endings."""
    lines: list[str] = []
    for s in sentences:
        lines += [*rows(s, **columns), ""]
    return lines


def write_treebank(
    path: Path, sentences: list[str], *, bom: bool = False, crlf: bool = False, **columns: bool
) -> Path:
    """Write ``sentences`` as a UTF-8 CoNLL-X file, optionally with a BOM and CRLF endings."""
    nl = "\r\n" if crlf else "\n"
    text = nl.join(treebank_lines(sentences, **columns)) + nl
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def punct_counts(sentences: list[str]) -> tuple[int, int]:
    """(all tokens, tokens that are not punctuation) of compact sentences, by tag ``Punc``."""
    tags = [item.split("/")[1] for s in sentences for item in s.split()]
    return len(tags), sum(t != "Punc" for t in tags)
