"""The sentence polarity data set (Pang & Lee 2005, nltk_data's ``sentence_polarity.zip``).

5,331 positive and 5,331 negative movie-review sentences, one per line, lowercased and tokenised,
in ``sentence_polarity/rt-polarity.pos`` and ``rt-polarity.neg``. The split is fixed and needs no
random generator: line ``i`` (0-based) of each file goes to dev when ``i % 10 == 8``, to test when
``i % 10 == 9`` and to train otherwise, so each split is balanced (train 8,530, dev 1,066,
test 1,066 sentences of the full data).
"""

from __future__ import annotations

import zipfile
from os import PathLike
from pathlib import Path

from msbp.data.errors import DataError

#: label ids: 0 negative, 1 positive
LABELS = ("negative", "positive")
MEMBERS = {0: "sentence_polarity/rt-polarity.neg", 1: "sentence_polarity/rt-polarity.pos"}
#: line i of each file goes to SPLIT_OF[i % 10]
SPLIT_OF = ("train",) * 8 + ("dev", "test")


def split_of(line: int) -> str:
    """The split ("train", "dev" or "test") of 0-based ``line`` of either file."""
    return SPLIT_OF[line % len(SPLIT_OF)]


def read_polarity(path: str | PathLike[str]) -> dict[str, list[tuple[str, int]]]:
    """``{"train" | "dev" | "test": [(sentence, label), ...]}`` from ``sentence_polarity.zip``.

    Labels: 0 negative, 1 positive; negatives first within each split, in file order. Blank
    lines are skipped (and do not count for the split). Raises ``DataError`` (one line) when the
    file is missing, not a zip, lacks either member, is not UTF-8 text, or a class is empty.
    """
    path = Path(path)
    hint = "expected nltk_data's sentence_polarity.zip (see ../shared/data/README.md)"
    if not path.is_file():
        raise DataError(f"{path}: no such file; {hint}")
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "dev": [], "test": []}
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            for label, member in MEMBERS.items():
                if member not in names:
                    raise DataError(f"{path}: no member {member!r} in the zip; {hint}")
                try:
                    text = archive.read(member).decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{path}: {member} is not UTF-8 text (byte {err.start}); {hint}"
                    ) from None
                lines = [line.strip() for line in text.splitlines()]
                lines = [line for line in lines if line]
                if not lines:
                    raise DataError(f"{path}: {member} holds no sentences; {hint}")
                for i, line in enumerate(lines):
                    splits[split_of(i)].append((line, label))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise DataError(f"{path}: not a readable zip ({type(err).__name__}: {err}); {hint}"
                        ) from None
    return splits
