"""Readers for dependency treebanks (CoNLL-U, CoNLL-X) and the NLTK CoNLL-2000 POS corpus.

CoNLL-U and CoNLL-X share the layout the parser needs: 10 tab-separated columns with ID, FORM,
LEMMA, a coarse tag (UPOS / CPOSTAG), a fine tag (XPOS / POSTAG), FEATS, HEAD and DEPREL in the
same places, so one reader serves both. Files may be gzip-compressed (detected by their magic
bytes, not their name); they must be UTF-8, with or without a byte-order mark, with LF or CRLF
line endings.
"""

from __future__ import annotations

import gzip
import logging
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: PTB punctuation tags (Chen & Manning's evaluation excludes tokens with these tags)
PUNCT_XPOS = frozenset({"``", "''", ",", ".", ":", "-LRB-", "-RRB-", "#", "$"})

#: the tag columns a task may read: Token attribute -> name in CoNLL-U / CoNLL-X
TAG_COLUMNS = {"xpos": "XPOS/POSTAG", "upos": "UPOS/CPOSTAG"}

#: share of "_" tags above which a tag column counts as absent
BLANK_TAG_SHARE = 0.99


def is_punct_form(form: str) -> bool:
    """True if ``form`` is non-empty and all its characters are Unicode punctuation (``P*``)."""
    return bool(form) and all(unicodedata.category(ch).startswith("P") for ch in form)


@dataclass(frozen=True)
class Token:
    """One syntactic word of a sentence; ``head`` is 0 for the root, else a 1-based index."""

    id: int
    form: str
    lemma: str
    upos: str
    xpos: str
    head: int
    deprel: str

    @property
    def is_punct(self) -> bool:
        """Punctuation by PTB tag (XPOS), by the UPOS tag ``PUNCT``, or by its form.

        The form rule is the CoNLL-X shared task's (``eval.pl``): a FORM made only of Unicode
        punctuation characters (category ``P*``: ``.``, ``«``, ``¿``, ``—``) is punctuation
        whatever its tags, so that treebanks with their own tag sets are scored fairly. Symbols
        (``S*``: ``+``, ``€``, ``°``) are not punctuation by this rule; a FORM ``_`` (``Pc``, as
        in CoNLL-X Turkish's inflectional groups) is, as in ``eval.pl``.
        """
        return self.xpos in PUNCT_XPOS or self.upos == "PUNCT" or is_punct_form(self.form)


Sentence = list[Token]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without line ending) of a plain or gzip file, decoded line by line.

    Decoding each line from bytes lets a bad byte be reported with its line number; a UTF-8
    byte-order mark is dropped (at the start of any line, so concatenated files work too).
    """
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    lineno = 0
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{path.name}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at "
                        f"byte {err.start + 1} of the line); convert the file to UTF-8, e.g. "
                        "iconv -f ISO-8859-1 -t UTF-8"
                    ) from None
                yield lineno, line.rstrip("\r\n").removeprefix("\ufeff")
        except (OSError, EOFError, zlib.error) as err:
            if not gz:
                raise
            # a truncated or corrupt archive: say where, not just zlib's words
            raise ValueError(f"{path.name}:{lineno + 1}: damaged gzip data ({err})") from None


def _parse_token(cols: list[str], where: str) -> Token | None:
    """A token from 10 columns, or None for multiword-token and empty-node lines."""
    raw_id = cols[0]
    if "-" in raw_id or "." in raw_id:
        return None  # multiword token (3-4) or empty node (5.1): not part of the basic tree
    try:
        tid = int(raw_id)
    except ValueError:
        raise ValueError(f"{where}: ID {raw_id!r} is not an integer") from None
    try:
        head = int(cols[6])
    except ValueError:
        raise ValueError(f"{where}: HEAD {cols[6]!r} is not an integer") from None
    if head < 0:
        raise ValueError(f"{where}: HEAD {head} is negative")
    if not cols[1]:
        raise ValueError(f"{where}: empty FORM")
    return Token(tid, cols[1], cols[2], cols[3], cols[4], head, cols[7])


def _check_sentence(tokens: Sentence, where: str) -> None:
    for expected, tok in enumerate(tokens, start=1):
        if tok.id != expected:
            raise ValueError(f"{where}: token IDs must run 1, 2, ...; found {tok.id} at {expected}")
    n = len(tokens)
    heads = [t.head for t in tokens]
    for tok in tokens:
        if tok.head > n:
            raise ValueError(f"{where}: token {tok.id} has HEAD {tok.head} > sentence length {n}")
    if not is_tree(heads):
        raise ValueError(f"{where}: the HEAD column does not form a tree rooted at 0 (a cycle)")


def iter_conll(path: str | Path) -> Iterator[Sentence]:
    """Sentences of a CoNLL-U or CoNLL-X file (plain or gzip), as lists of ``Token``.

    Comment lines (``#``), multiword-token lines (ID ``3-4``) and empty-node lines (ID ``5.1``)
    are skipped. Several roots (HEAD 0) in one sentence are allowed, as in CoNLL-X. Raises
    ``ValueError`` naming the file and line for malformed input (not UTF-8, damaged gzip data,
    wrong column count, non-integer ID or HEAD, IDs out of order, a HEAD outside the sentence, a
    cycle).
    """
    path = Path(path)
    tokens: Sentence = []
    start = 0
    for lineno, line in _lines(path):
        if not line.strip():
            if tokens:
                _check_sentence(tokens, f"{path.name}:{start}")
                yield tokens
            tokens = []
            continue
        if line.startswith("#"):  # token lines start with an ID, never with '#'
            continue
        cols = line.split("\t")
        where = f"{path.name}:{lineno}"
        if len(cols) != 10:
            raise ValueError(
                f"{where}: expected 10 tab-separated columns, got {len(cols)}: {line[:60]!r}"
            )
        tok = _parse_token(cols, where)
        if tok is None:
            continue
        if not tokens:
            start = lineno
        tokens.append(tok)
    if tokens:
        _check_sentence(tokens, f"{path.name}:{start}")
        yield tokens


def read_conll(path: str | Path) -> list[Sentence]:
    """All sentences of a CoNLL-U / CoNLL-X file; see ``iter_conll``.

    Example:
        >>> sents = read_conll("../shared/data/ud_en_ewt/dev.conllu.gz")  # doctest: +SKIP
        >>> sents[0][0].form, sents[0][0].xpos, sents[0][0].head  # doctest: +SKIP
    """
    sentences = list(iter_conll(path))
    nonproj = sum(not is_projective([t.head for t in s]) for s in sentences)
    log.info("%s: %d sentences, %d non-projective", Path(path).name, len(sentences), nonproj)
    return sentences


def choose_tag_column(sentences: Sequence[Sentence], preferred: str = "xpos") -> tuple[str, str]:
    """The tag column to read (``"xpos"`` or ``"upos"``) and a note for the log ("" if none).

    ``preferred`` is used unless it is ``_`` for at least ``BLANK_TAG_SHARE`` of the tokens of
    ``sentences`` (many UD treebanks have no XPOS) and the other column has tags; if both are
    blank, ``preferred`` is kept (every token gets the tag ``_``) and the note says so.
    """
    if preferred not in TAG_COLUMNS:
        raise ValueError(f"tag column must be one of {sorted(TAG_COLUMNS)}, got {preferred!r}")
    other = "upos" if preferred == "xpos" else "xpos"
    total = sum(len(s) for s in sentences)

    def blank(column: str) -> float:
        return sum(getattr(t, column) == "_" for s in sentences for t in s) / max(total, 1)

    share = blank(preferred)
    if share < BLANK_TAG_SHARE:
        return preferred, ""
    if blank(other) < BLANK_TAG_SHARE:
        return other, (
            f"{TAG_COLUMNS[preferred]} is '_' for {100 * share:.0f}% of training tokens, "
            f"using {TAG_COLUMNS[other]} tags instead"
        )
    return preferred, (
        f"{TAG_COLUMNS[preferred]} and {TAG_COLUMNS[other]} are both '_': "
        "no tags (one tag for every token)"
    )


def is_tree(heads: Sequence[int]) -> bool:
    """True if ``heads`` (head of token i+1 at index i; 0 = root) has no cycle."""
    n = len(heads)
    state = [0] * (n + 1)  # 0 unseen, 1 on the current path, 2 known to reach the root
    state[0] = 2
    for start in range(1, n + 1):
        path = []
        node = start
        while state[node] == 0:
            state[node] = 1
            path.append(node)
            node = heads[node - 1]
            if not 0 <= node <= n:
                return False
        if state[node] == 1:
            return False
        for p in path:
            state[p] = 2
    return True


def is_projective(heads: Sequence[int]) -> bool:
    """True if the tree ``heads`` (head of token i+1 at index i; 0 = root) has no crossing arcs.

    The root arc counts too (an arc from position 0), so a tree whose root word is covered by an
    arc is non-projective, as in arc-standard parsing.
    """
    arcs = [(min(h, d), max(h, d)) for d, h in enumerate(heads, start=1)]
    for i, (a, b) in enumerate(arcs):
        for c, d in arcs[i + 1 :]:
            if a < c < b < d or c < a < d < b:
                return False
    return True


def read_conll2000(
    path: str | Path, member: str = "train.txt"
) -> list[list[tuple[str, str]]]:
    """Sentences of NLTK's ``conll2000.zip`` (WSJ, lines ``word POS chunk``) as (word, POS) pairs.

    ``member`` is ``"train.txt"`` (WSJ sections 15-18) or ``"test.txt"`` (section 20); it is read
    with ``zipfile`` in place. Raises ``ValueError`` naming the member and line for lines that do
    not have 3 space-separated fields.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("/" + member) or n == member]
        if not names:
            raise ValueError(f"{path.name} has no member {member!r}; it has {z.namelist()}")
        text = z.read(names[0]).decode("utf-8")
    sentences: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if current:
                sentences.append(current)
            current = []
            continue
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(
                f"{path.name}/{names[0]}:{lineno}: expected 'word POS chunk', got {line!r}"
            )
        current.append((fields[0], fields[1]))
    if current:
        sentences.append(current)
    return sentences
