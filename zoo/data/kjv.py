"""English text for byte-level language modelling: the King James Bible as Debian ships it (nothing is downloaded).

Source: the Debian package ``bible-kjv-text`` (``/usr/lib/bible.data``, the Bible Retrieval System's compressed text
of the King James Version, 1611; public domain: its copyright has long expired, as the package's copyright file
says) read through the ``bible`` program of the package ``bible-kjv`` (GPL-2+, installed with the text as its
recommended package)::

    apt-get install -y bible-kjv-text bible-kjv
    bible -f gen1:1-rev22:21 > kjv.txt          # 31,102 verses, one a line: "Ge1:1 In the beginning God ..."

(Debian 12's version 4.38 gives 4,404,412 bytes of such lines; the books' texts, 4,137,850 bytes of ASCII, have the
sha256 b5c4940bcfeee072c0935b5200d0f9d88a00a0199cb0961d16133458fcdfae5d, which ``KJVSplits.summary()`` reports.)

:func:`load_kjv` runs that command itself when no file is given, or reads such a file (``path=``: e.g. a copy taken
to a machine without the packages). Books are kept whole and in order; a book's text is its verses without their
references, one verse a line. :func:`kjv_splits` holds out whole books, never single lines: the test books
(Joshua, Proverbs, Romans, Revelation: history, wisdom, epistle and prophecy, from both testaments, none with a
parallel account elsewhere, unlike the gospels or Kings / Chronicles) and the validation books (Ruth, Ecclesiastes,
Jonah, Galatians); the other 58 books are the training text.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch

__all__ = ["BOOKS", "TEST_BOOKS", "VAL_BOOKS", "KJVSplits", "load_kjv", "kjv_splits", "encode_bytes", "kjv_source"]

# The 66 books in order: the abbreviation the `bible` program prints -> the book's name.
BOOKS: Dict[str, str] = dict(
    Ge="Genesis", Exo="Exodus", Lev="Leviticus", Num="Numbers", Deu="Deuteronomy", Josh="Joshua", Jdgs="Judges",
    Ruth="Ruth", **{"1Sm": "1 Samuel", "2Sm": "2 Samuel", "1Ki": "1 Kings", "2Ki": "2 Kings", "1Chr": "1 Chronicles",
                    "2Chr": "2 Chronicles"},
    Ezra="Ezra", Neh="Nehemiah", Est="Esther", Job="Job", Psa="Psalms", Prv="Proverbs", Eccl="Ecclesiastes",
    SSol="Song of Solomon", Isa="Isaiah", Jer="Jeremiah", Lam="Lamentations", Eze="Ezekiel", Dan="Daniel",
    Hos="Hosea", Joel="Joel", Amos="Amos", Obad="Obadiah", Jonah="Jonah", Mic="Micah", Nahum="Nahum",
    Hab="Habakkuk", Zep="Zephaniah", Hag="Haggai", Zec="Zechariah", Mal="Malachi", Mat="Matthew", Mark="Mark",
    Luke="Luke", John="John", Acts="Acts", Rom="Romans", **{"1Cor": "1 Corinthians", "2Cor": "2 Corinthians"},
    Gal="Galatians", Eph="Ephesians", Phi="Philippians", Col="Colossians",
    **{"1Th": "1 Thessalonians", "2Th": "2 Thessalonians", "1Tim": "1 Timothy", "2Tim": "2 Timothy"},
    Titus="Titus", Phmn="Philemon", Heb="Hebrews", Jas="James", **{"1Pet": "1 Peter", "2Pet": "2 Peter",
                                                                  "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John"},
    Jude="Jude", Rev="Revelation",
)
TEST_BOOKS = ("Joshua", "Proverbs", "Romans", "Revelation")
VAL_BOOKS = ("Ruth", "Ecclesiastes", "Jonah", "Galatians")

BIBLE_COMMAND = ("bible", "-f", "gen1:1-rev22:21")
_INSTALL = ("install the Debian packages that hold the text and its reader (apt-get install -y bible-kjv-text "
            "bible-kjv), or give the path of a text file written by `bible -f gen1:1-rev22:21 > kjv.txt`")
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def kjv_source(path: Union[None, str, os.PathLike] = None) -> str:
    """Where :func:`load_kjv` reads from: the file, or the command it runs."""
    return str(Path(path).expanduser()) if path is not None else " ".join(BIBLE_COMMAND) + " (Debian bible-kjv-text)"


def _read_lines(path: Union[None, str, os.PathLike]) -> List[str]:
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"KJV text not found: {path} is not a file; {_INSTALL}")
        return path.read_text(encoding="utf-8").splitlines()
    if shutil.which(BIBLE_COMMAND[0]) is None:
        raise FileNotFoundError(f"the King James Bible is not installed (no `bible` program on PATH): {_INSTALL}")
    done = subprocess.run(BIBLE_COMMAND, capture_output=True, text=True, encoding="utf-8")
    if done.returncode or not done.stdout.strip():
        raise FileNotFoundError(f"`{' '.join(BIBLE_COMMAND)}` failed (exit {done.returncode}: "
                                f"{done.stderr.strip()[:200] or 'no output'}); the text file /usr/lib/bible.data may be "
                                f"missing: {_INSTALL}")
    return done.stdout.splitlines()


def load_kjv(path: Union[None, str, os.PathLike] = None) -> Dict[str, str]:
    """The 66 books in order, name -> text (verses without references, one a line, ending with a newline).

    ``path``: a file of `bible -f` lines ("Ge1:1 In the beginning ..."); blank lines are skipped. Without it the
    installed ``bible`` program prints the text. A line that is not a verse, a book out of order or missing, or an
    unknown book abbreviation raises a ValueError naming the line.
    """
    verses: Dict[str, List[str]] = {}
    order = list(BOOKS)
    where = kjv_source(path)
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m is None:
            raise ValueError(f"{where}, line {number}: expected a verse as `bible -f` prints it "
                             f"('Ge1:1 In the beginning ...'), got {line[:80]!r}")
        abbrev = m.group(1)
        if abbrev not in BOOKS:
            raise ValueError(f"{where}, line {number}: unknown book {abbrev!r}; expected one of {', '.join(order)}")
        if abbrev not in verses:
            if verses and order.index(abbrev) < order.index(next(reversed(verses))):
                raise ValueError(f"{where}, line {number}: book {abbrev!r} out of order (after {next(reversed(verses))!r})")
            verses[abbrev] = []
        verses[abbrev].append(m.group(4))
    missing = [BOOKS[a] for a in order if a not in verses]
    if missing:
        raise ValueError(f"{where}: the text lacks {len(missing)} of the 66 books ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}); expected the whole Bible (bible -f gen1:1-rev22:21)")
    return {BOOKS[a]: "\n".join(v) + "\n" for a, v in verses.items()}


def encode_bytes(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a (length,) uint8 tensor: the token ids of a byte-level model (vocabulary 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


@dataclass
class KJVSplits:
    """Byte streams (uint8) of the training, validation and test books, each the books' texts concatenated in
    canonical order, and the book names of each part."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    books: Dict[str, List[str]]
    source: str
    sha256: str = ""  # of the whole text, the 66 books' texts concatenated in order (UTF-8)

    def summary(self) -> dict:
        return {"source": self.source, "licence": "public domain (King James Version, 1611)", "text_sha256": self.sha256,
                **{f"{k}_bytes": int(getattr(self, k).numel()) for k in ("train", "val", "test")},
                "val_books": self.books["val"], "test_books": self.books["test"],
                "train_books": len(self.books["train"])}


def kjv_splits(path: Union[None, str, os.PathLike] = None, test_books: Sequence[str] = TEST_BOOKS,
               val_books: Sequence[str] = VAL_BOOKS) -> KJVSplits:
    """The text split by whole books: ``test_books`` and ``val_books`` held out (book names as in :data:`BOOKS`),
    every other book for training."""
    books = load_kjv(path)
    names = list(books)
    for what, chosen in (("test_books", test_books), ("val_books", val_books)):
        unknown = [b for b in chosen if b not in books]
        if unknown:
            raise ValueError(f"kjv_splits: unknown {what} {unknown}; book names are: {', '.join(names)}")
        if not chosen:
            raise ValueError(f"kjv_splits: {what} is empty; hold out at least one book")
    both = sorted(set(test_books) & set(val_books))
    if both:
        raise ValueError(f"kjv_splits: books in both test_books and val_books: {both}")
    held = set(test_books) | set(val_books)
    parts = {"train": [b for b in names if b not in held], "val": [b for b in names if b in set(val_books)],
             "test": [b for b in names if b in set(test_books)]}
    if not parts["train"]:
        raise ValueError("kjv_splits: every book is held out; nothing is left to train on")
    streams = {k: encode_bytes("".join(books[b] for b in v)) for k, v in parts.items()}
    digest = hashlib.sha256("".join(books.values()).encode("utf-8")).hexdigest()
    return KJVSplits(**streams, books=parts, source=kjv_source(path), sha256=digest)
