"""Documents in: TXT/Markdown, PDF (PyMuPDF), EPUB (ebooklib), SRT (pysrt) and VTT (webvtt-py).

Every format becomes a list of `Segment`s (a page, a chapter, a subtitle cue) whose texts, joined
with blank lines, are the document's text. Tokenization streams in pieces and records, for every
token, its character offset in that text (`SourceMap`), so anything that points at a token (a
citation, a retained cache slot) can point at a page, chapter or timestamp.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from .errors import UserError

# a line that is a heading: "Chapter 12", "CHAPTER XII", "# Title", "Book II", "Part 3", "Psalm 23"
# (one line: [ \t] rather than \s, so that with re.MULTILINE a match never spans lines)
HEADING = re.compile(r"^[ \t]*(#{1,6}[ \t]+\S.*|(chapter|book|part|section|psalm|act|scene|canto)[ \t]+"
                     r"([0-9]+|[ivxlcdm]+|[a-z]+)\b.{0,60})[ \t]*$", re.IGNORECASE | re.MULTILINE)
HEADING_CHARS = 90  # a longer line is prose that happens to start like a heading
SUPPORTED = (".txt", ".md", ".markdown", ".pdf", ".epub", ".srt", ".vtt")
SEPARATOR = "\n\n"


@dataclass
class Segment:
    text: str
    label: str  # "p. 3", "ch. 2: The Storm", "00:01:02 Alice", or "" for plain text
    meta: dict = field(default_factory=dict)


@dataclass
class Document:
    path: str | None
    kind: str  # txt | md | pdf | epub | srt | vtt | text (pasted)
    title: str
    segments: list[Segment]
    sha256: str

    @property
    def transcript(self) -> bool:
        """Subtitles or a transcript (SRT, VTT): short timed cues, not prose."""
        return self.kind in ("srt", "vtt")

    @property
    def text(self) -> str:
        return SEPARATOR.join(s.text for s in self.segments)

    def segment_starts(self) -> list[int]:
        starts, at = [], 0
        for s in self.segments:
            starts.append(at)
            at += len(s.text) + len(SEPARATOR)
        return starts

    @property
    def units(self) -> str:
        """What a segment is, for display: pages, chapters, cues."""
        return {"pdf": "pages", "epub": "chapters", "srt": "cues", "vtt": "cues"}.get(self.kind, "parts")


# ------------------------------------------------------------------ loading

def load_document(path: str | os.PathLike) -> Document:
    """Read any supported file; every problem becomes a one-line UserError naming the file."""
    p = Path(path)
    name = str(path)
    try:
        if not p.exists():
            raise UserError(f"{name}: no such file")
        if p.is_dir():
            raise UserError(f"{name}: is a directory, not a document")
        if not p.is_file():
            raise UserError(f"{name}: is not a regular file")
    except OSError as e:  # e.g. a folder on the way that we may not enter
        raise UserError(f"{name}: cannot be read ({e.strerror or e})") from None
    ext = p.suffix.lower()
    if ext not in SUPPORTED:
        raise UserError(f"{name}: unsupported file type '{ext or '(none)'}'; use one of {', '.join(SUPPORTED)}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{name}: cannot be read ({e.strerror or e})") from None
    if not data.strip():
        raise UserError(f"{name}: is empty")
    digest = hashlib.sha256(data).hexdigest()
    loader = {".pdf": _pdf, ".epub": _epub, ".srt": _srt, ".vtt": _vtt}.get(ext, _plain)
    kind, title, segments = loader(p, data)
    segments = [s for s in segments if s.text.strip()]
    if not segments:
        raise UserError(f"{name}: contains no text")
    return Document(path=str(p), kind=kind, title=title or p.stem, segments=segments, sha256=digest)


def document_from_text(text: str, title: str = "pasted text") -> Document:
    text = _normalise(text)
    if not text.strip():
        raise UserError(f"{title}: the text is empty")
    return Document(path=None, kind="text", title=title, segments=[Segment(text, "")],
                    sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
# C0 control characters and DEL, which real text never holds (tab, newlines and form feed it does), and U+FFFD
_NOT_TEXT = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\ufffd]")


def _checked(text: str, name: str) -> str:
    """Refuse text that is really binary data (decoded bytes full of NULs, controls, replacements)."""
    bad = len(_NOT_TEXT.findall(text))
    if "\x00" in text or bad > max(8, len(text) // 100):
        raise UserError(f"{name}: is not a text file (binary data)")
    return _normalise(text)


def decode_text(data: bytes, name: str) -> str:
    """Bytes to text: BOMs first, then UTF-8, then charset detection (Latin-1, cp1252, ...)."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return _checked(data.decode(enc, errors="replace"), name)
    if b"\x00" in data[:4096]:
        # UTF-16 without a BOM: every other byte is zero (ASCII-range text), the others are not
        even, odd = data[0:4096:2], data[1:4096:2]
        if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.05 * len(even):
            return _checked(data.decode("utf-16-le", errors="replace"), name)
        if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.05 * len(odd):
            return _checked(data.decode("utf-16-be", errors="replace"), name)
        raise UserError(f"{name}: is not a text file (binary data)")
    try:
        return _checked(data.decode("utf-8"), name)
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = from_bytes(data)
    best = matches.best()
    if best is None:
        raise UserError(f"{name}: is not a text file (unknown encoding)")
    # Short Western texts are ambiguous between 8-bit code pages (Latin-1 vs Baltic, say); prefer
    # Windows-1252 (a superset of Latin-1) whenever the detector finds it about as plausible.
    western = next((m for m in matches if m.encoding == "cp1252"), None)
    if western is not None and western.chaos <= best.chaos + 0.2:
        best = western
    return _checked(str(best), name)


def _plain(p: Path, data: bytes):
    text = decode_text(data, str(p))
    kind = "md" if p.suffix.lower() in (".md", ".markdown") else "txt"
    title = ""
    if kind == "md":
        m = re.search(r"^#\s+(.+)$", text, flags=re.MULTILINE)
        title = m.group(1).strip() if m else ""
    return kind, title, [Segment(text, "")]


def _page_ranges(pages: list[int]) -> str:
    """[2, 3, 4, 7] -> "2-4, 7"."""
    out, i = [], 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        out.append(str(pages[i]) if i == j else f"{pages[i]}-{pages[j]}")
        i = j + 1
    return ", ".join(out)


def _pdf(p: Path, data: bytes):
    import pymupdf

    name = str(p)
    if b"%PDF-" not in data[:1024]:  # the header may follow a little junk, but not much
        raise UserError(f"{name}: is corrupt or not a PDF (no PDF header)")
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except Exception:  # PyMuPDF raises its own error types for damaged files
        raise UserError(f"{name}: is corrupt or not a PDF") from None
    with doc:
        if doc.needs_pass:
            raise UserError(f"{name}: is encrypted (password-protected); decrypt it first")
        if doc.page_count == 0:
            raise UserError(f"{name}: is corrupt or not a PDF (no pages)")
        segments = []
        try:
            for i, page in enumerate(doc):
                segments.append(Segment(_normalise(page.get_text("text")).strip(), f"p. {i + 1}", {"page": i + 1}))
        except Exception:
            raise UserError(f"{name}: is corrupt (page {len(segments) + 1} cannot be read)") from None
        repaired = doc.is_repaired
        empty = [s.meta["page"] for s in segments if not s.text]
        if repaired and empty and len(empty) < len(segments):
            # MuPDF rebuilt a broken file (typically cut short); pages it lost come back blank, and
            # reading on without them would be a silent truncation
            raise UserError(f"{name}: is corrupt or truncated (pages {_page_ranges(empty)} of {len(segments)} "
                            "cannot be read)")
        try:
            title = ((doc.metadata or {}).get("title") or "").strip()
        except Exception:
            title = ""
    if not any(s.text for s in segments):
        if repaired:
            raise UserError(f"{name}: is corrupt or not a PDF (no readable text)")
        raise UserError(f"{name}: has no text layer (scanned?); OCR it first")
    return "pdf", title, segments


class _HTMLText(HTMLParser):
    """Visible text of an XHTML chapter: HTML whitespace rules, block elements as paragraph breaks."""

    BLOCKS = frozenset({"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "blockquote",
                        "pre", "article", "aside", "header", "footer", "figure", "figcaption", "dt", "dd", "table",
                        "hr"})
    HIDDEN = frozenset({"script", "style", "head", "title", "svg"})
    HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.heading: str | None = None
        self._in_heading = False
        self._hidden = 0
        self._pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self._hidden += 1
        if tag == "pre":
            self._pre += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag in self.HEADINGS and self.heading is None:
            self._in_heading, self.heading = True, ""

    def handle_startendtag(self, tag, attrs):
        if tag in self.BLOCKS:  # <br/>, <hr/>
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag in self.HEADINGS:
            self._in_heading = False

    def handle_data(self, data):
        if self._hidden:
            return
        if not self._pre:
            data = re.sub(r"[ \t\n\r\f]+", " ", data)  # source line wraps are spaces in HTML
        self.parts.append(data.replace("\u00a0", " "))
        if self._in_heading:
            self.heading += data

    def text(self) -> str:
        lines = [line.strip() for line in "".join(self.parts).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _epub_drm(p: Path) -> bool:
    """True where META-INF/encryption.xml encrypts content documents (DRM), not just fonts."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as zf:
            if "META-INF/encryption.xml" not in zf.namelist():
                return False
            xml = zf.read("META-INF/encryption.xml").decode("utf-8", errors="replace")
    except Exception:
        return False  # not a zip at all: ebooklib will say so
    uris = re.findall(r"<(?:\w+:)?CipherReference[^>]*URI\s*=\s*[\"']([^\"']+)", xml)
    return any(u.lower().endswith((".xhtml", ".html", ".htm", ".xml")) for u in uris)


def _epub(p: Path, data: bytes):
    import warnings
    from urllib.parse import unquote

    import ebooklib
    from ebooklib import epub

    name = str(p)
    if _epub_drm(p):
        raise UserError(f"{name}: is encrypted (DRM-protected EPUB); it cannot be read")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            book = epub.read_epub(str(p), options={"ignore_ncx": True})
    except Exception:
        raise UserError(f"{name}: is corrupt or not an EPUB") from None
    toc_titles: dict[str, str] = {}

    def remember(href, title):
        if href and title and title.strip():
            toc_titles.setdefault(unquote(href.split("#")[0]), " ".join(title.split()))

    def walk(items):
        for it in items:
            if isinstance(it, (tuple, list)):
                section, children = it[0], it[1] if len(it) > 1 else []
                remember(getattr(section, "href", None), getattr(section, "title", None))
                walk(children)
            else:
                remember(getattr(it, "href", None), getattr(it, "title", None))

    walk(book.toc or [])
    segments = []
    for idref, _ in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
            continue
        parser = _HTMLText()
        try:
            parser.feed(item.get_content().decode("utf-8", errors="replace"))
            parser.close()
        except Exception:
            raise UserError(f"{name}: chapter {item.get_name()} is corrupt") from None
        text = parser.text()
        if not text:
            continue
        k = len(segments) + 1
        title = (toc_titles.get(unquote(item.get_name())) or " ".join((parser.heading or "").split())
                 or f"chapter {k}")
        segments.append(Segment(text, f"ch. {k}: {title}", {"chapter": k, "title": title}))
    meta = book.get_metadata("DC", "title")
    title = (meta[0][0] or "").strip() if meta else ""
    return "epub", title, segments


# "Alice: ...", "- DR. LEE: ...", ">> Speaker 2: ...": one to three capitalised words (or numbers) and a colon
_WORD = r"(?:[A-Z][\w.'-]*|\d+)"
_SPEAKER = re.compile(rf"^\s*(?:-|>>)?\s*([A-Z][\w.'-]*(?: {_WORD}){{0,2}}):\s+(.*)$", re.DOTALL)
_TAGS = re.compile(r"<[^>]*>|\{\\[^}]*\}")  # HTML-like cue tags and ASS overrides such as {\an8}


def _cue(start: str, end: str, text: str, speaker: str | None) -> Segment | None:
    start, end = start.replace(",", "."), end.replace(",", ".")  # SRT writes 00:01:02,500
    text = html.unescape(_TAGS.sub("", text)).strip()
    if speaker is None:
        m = _SPEAKER.match(text)
        if m:
            speaker, text = m.group(1).strip(), m.group(2).strip()
    if not text:
        return None  # a cue with only tags or sound-effect markup: no text to read
    stamp = start.split(".")[0]
    label = f"{stamp} {speaker}" if speaker else stamp
    prefix = f"[{stamp}] {speaker}: " if speaker else f"[{stamp}] "
    return Segment(prefix + " ".join(text.split()), label, {"start": start, "end": end, "speaker": speaker})


def _srt(p: Path, data: bytes):
    import pysrt

    text = decode_text(data, str(p))
    try:
        subs = pysrt.from_string(text, error_handling=pysrt.ERROR_RAISE)
    except Exception:
        raise UserError(f"{p}: is not a valid SRT file") from None
    if not len(subs):
        raise UserError(f"{p}: has no subtitle cues")
    cues = (_cue(str(s.start), str(s.end), s.text, None) for s in subs)
    return "srt", "", [c for c in cues if c is not None]


def _vtt(p: Path, data: bytes):
    import io

    import webvtt

    text = decode_text(data, str(p))
    try:
        vtt = webvtt.from_buffer(io.StringIO(text))
        cues = list(vtt)
    except Exception:
        raise UserError(f"{p}: is not a valid WebVTT file") from None
    if not cues:
        raise UserError(f"{p}: has no subtitle cues")
    segments = []
    for c in cues:
        raw = c.raw_text if hasattr(c, "raw_text") else c.text
        voice = re.search(r"<v(?:\.[\w.-]+)*\s+([^>]+)>", raw)
        segments.append(_cue(c.start, c.end, raw, voice.group(1).strip() if voice else None))
    return "vtt", "", [c for c in segments if c is not None]


# ------------------------------------------------------------------ structure: chapters and sections

def chapters(document: Document) -> list[tuple[int, int, str]] | None:
    """(start_char, end_char, label) of the chapters that heading lines mark, in order, covering the text.

    Heading lines ("Chapter 12", "CHAPTER XII", markdown "# ..."; `HEADING`) make chapters in any
    kind of text, plain or PDF (labelled by the heading, with the pages they span). Text before the
    first heading is an "opening" chapter. None with fewer than two headings, and for subtitles:
    then the document's own segments (EPUB chapters, PDF pages, cues) are its structure.
    """
    text = document.text
    heads = [m for m in HEADING.finditer(text) if len(m.group(0)) < HEADING_CHARS]
    if len(heads) < 2 or document.transcript:
        return None
    out = []
    if text[:heads[0].start()].strip():
        out.append((0, heads[0].start(), "opening"))
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        label = " ".join(m.group(0).strip().lstrip("#").split())
        out.append((m.start(), end, label))
    if document.kind == "pdf":  # say where each chapter is: "Chapter 3 (p. 4-6)"
        out = [(a, b, f"{label} ({span_label(document, a, b)})") for a, b, label in out]
    return [(a, len(text[:b].rstrip()) if b > a else b, label) for a, b, label in out]


def span_label(document: Document, start: int, end: int) -> str:
    """Where a character span is, for a reader: "p. 4-6", "ch. 2: Title", "00:01:02-00:04:10", "lines 12-80"."""
    starts = np.asarray(document.segment_starts(), dtype=np.int64)
    first = int(np.searchsorted(starts, start, side="right") - 1)
    last = int(np.searchsorted(starts, max(start, end - 1), side="right") - 1)
    segs = document.segments
    if document.kind == "pdf":
        a, b = segs[first].meta["page"], segs[last].meta["page"]
        return f"p. {a}" if a == b else f"p. {a}-{b}"
    if document.transcript:
        a, b = segs[first].meta["start"].split(".")[0], segs[last].meta["end"].split(".")[0]
        return f"{a}-{b}"
    if document.kind == "epub":
        return segs[first].label if first == last else f"{segs[first].label} - {segs[last].label}"
    text = document.text
    end = start + len(text[start:end].rstrip())  # a trailing blank line is not part of the span
    a = text.count("\n", 0, start) + 1
    b = a + text.count("\n", start, max(start, end - 1))
    return f"line {a}" if a == b else f"lines {a}-{b}"


# ------------------------------------------------------------------ tokens and where they came from

class SourceMap:
    """token index -> char offset in Document.text -> segment (page / chapter / timestamp).

    Offsets are int64, one per token, in reading order; tokens that are not document text (a
    prompt prefix) have offset -1, locate to segment -1 and label "".
    """

    def __init__(self, document: Document):
        self.document = document
        self._starts = np.asarray(document.segment_starts(), dtype=np.int64)
        self._chunks: list[np.ndarray] = []
        self._offsets: np.ndarray | None = np.zeros(0, dtype=np.int64)
        self._count = 0
        self._text: str | None = None

    def append(self, char_offsets) -> None:
        chunk = np.asarray(char_offsets, dtype=np.int64).reshape(-1)
        self._chunks.append(chunk)
        self._count += len(chunk)
        self._offsets = None

    @property
    def offsets(self) -> np.ndarray:
        """[tokens] char offset of every token (-1 for prompt tokens outside the document)."""
        if self._offsets is None:
            self._offsets = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int64)
            self._chunks = [self._offsets]
        return self._offsets

    def __len__(self) -> int:
        return self._count

    def char_offset(self, token_index: int) -> int:
        return int(self.offsets[token_index])

    def segment_of_chars(self, chars) -> np.ndarray:
        """Segment index of char offsets (offsets before the text count as segment 0)."""
        return np.maximum(np.searchsorted(self._starts, chars, side="right") - 1, 0)

    def locate(self, token_index: int) -> dict:
        c = self.char_offset(token_index)
        if c < 0:
            return {"token": int(token_index), "char": c, "segment": -1, "label": ""}
        k = int(self.segment_of_chars(c))
        seg = self.document.segments[k]
        return {"token": int(token_index), "char": c, "segment": k, "label": seg.label, **seg.meta}

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.document.text
        return self._text

    def excerpt(self, token_index: int, radius_chars: int = 120) -> str:
        """The document text around a token, whitespace collapsed, with ellipses where cut."""
        c = self.char_offset(token_index)
        if c < 0:
            return ""
        a, b = max(0, c - radius_chars), min(len(self.text), c + radius_chars)
        return ("…" if a else "") + " ".join(self.text[a:b].split()) + ("…" if b < len(self.text) else "")

    def labels_for(self, token_indices) -> list[str]:
        chars = self.offsets[np.asarray(token_indices, dtype=np.int64).reshape(-1)]
        segs = self.segment_of_chars(chars)
        labels = [s.label for s in self.document.segments]
        return [labels[k] if c >= 0 else "" for k, c in zip(segs.tolist(), chars.tolist())]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"offsets": self.offsets}

    @classmethod
    def from_arrays(cls, document: Document, arrays: dict) -> SourceMap:
        offsets = np.asarray(arrays["offsets"], dtype=np.int64).reshape(-1)
        if len(offsets) and (offsets.min() < -1 or offsets.max() >= max(len(document.text), 1)):
            raise UserError(f"{document.title}: the saved source map does not fit the document")
        sm = cls(document)
        sm.append(offsets)
        return sm


def _pieces(text: str, piece_chars: int) -> Iterator[tuple[int, str]]:
    """Cut text near every piece_chars, at the start of a whitespace run, so no word is split.

    The whitespace opens the next piece, where a BPE tokenizer expects it (" word"), so streamed
    tokens match whole-text tokenization except, rarely, right at a cut. Text with no whitespace
    in the second half of a piece (CJK, say) is cut at piece_chars.
    """
    at, n = 0, len(text)
    piece_chars = max(int(piece_chars), 2)
    while at < n:
        end = min(n, at + piece_chars)
        if end < n:
            lo = at + piece_chars // 2
            cut = max(text.rfind(" ", lo, end), text.rfind("\n", lo, end), text.rfind("\t", lo, end))
            if cut > at:
                while cut - 1 > at and text[cut - 1].isspace():  # back to the start of the run
                    cut -= 1
                end = cut
        yield at, text[at:end]
        at = end


def tokenize_stream(document: Document, tokenizer, piece_chars: int = 20000, prefix: str = "",
                    source_map: SourceMap | None = None) -> Iterator[list[int]]:
    """Yield token ids piece by piece (never the whole document at once), recording char offsets.

    `prefix` is tokenized first (its tokens get offset -1). With a `source_map`, every token's char
    offset in document.text is appended to it; that needs a fast (Rust) tokenizer.
    """
    if source_map is not None and not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                        "token offsets (citations) need one")
    if prefix:
        ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        if source_map is not None:
            source_map.append(np.full(len(ids), -1, dtype=np.int64))
        yield ids
    text = document.text
    for start, piece in _pieces(text, piece_chars):
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=source_map is not None)
        ids = list(enc["input_ids"])
        if source_map is not None:
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)[:, 0]
            source_map.append(start + offsets)
        yield ids


def count_tokens(document: Document, tokenizer, piece_chars: int = 20000) -> int:
    """Exact number of tokens tokenize_stream yields for the document (without a prefix)."""
    return sum(len(ids) for ids in tokenize_stream(document, tokenizer, piece_chars))
