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
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

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
    if not p.exists():
        raise UserError(f"{name}: no such file")
    if p.is_dir():
        raise UserError(f"{name}: is a directory, not a document")
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


def decode_text(data: bytes, name: str) -> str:
    """Bytes to text: BOMs first, then UTF-8, then charset detection (Latin-1, cp1252, ...)."""
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            return _normalise(data.decode(enc, errors="replace"))
    if b"\x00" in data[:4096]:
        # UTF-16 without a BOM shows up as every other byte zero; anything else with NULs is binary
        even, odd = data[0:4096:2], data[1:4096:2]
        if odd.count(0) > 0.4 * len(odd):
            return _normalise(data.decode("utf-16-le", errors="replace"))
        if even.count(0) > 0.4 * len(even):
            return _normalise(data.decode("utf-16-be", errors="replace"))
        raise UserError(f"{name}: is not a text file (binary data)")
    try:
        return _normalise(data.decode("utf-8"))
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
    return _normalise(str(best))


def _plain(p: Path, data: bytes):
    text = decode_text(data, str(p))
    kind = "md" if p.suffix.lower() in (".md", ".markdown") else "txt"
    title = ""
    if kind == "md":
        m = re.search(r"^#\s+(.+)$", text, flags=re.M)
        title = m.group(1).strip() if m else ""
    return kind, title, [Segment(text, "")]


def _pdf(p: Path, data: bytes):
    import pymupdf

    name = str(p)
    if not data.startswith(b"%PDF"):
        raise UserError(f"{name}: is corrupt or not a PDF (no PDF header)")
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except Exception:  # PyMuPDF raises its own error types for damaged files
        raise UserError(f"{name}: is corrupt or not a PDF") from None
    with doc:
        if doc.needs_pass:
            raise UserError(f"{name}: is encrypted (password-protected); decrypt it first")
        if doc.page_count == 0:
            raise UserError(f"{name}: is corrupt or has no pages")
        segments = []
        try:
            for i, page in enumerate(doc):
                segments.append(Segment(_normalise(page.get_text("text")).strip(), f"p. {i + 1}", {"page": i + 1}))
        except Exception:
            raise UserError(f"{name}: is corrupt (page {len(segments) + 1} cannot be read)") from None
        title = (doc.metadata or {}).get("title") or ""
    if not any(s.text for s in segments):
        raise UserError(f"{name}: has no text layer (scanned?); OCR it first")
    return "pdf", title, segments


class _HTMLText(HTMLParser):
    """Visible text of an XHTML chapter, with block elements as line breaks."""

    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.heading: str | None = None
        self._in_heading = False
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._skip += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag in ("h1", "h2", "h3") and self.heading is None:
            self._in_heading, self.heading = True, ""

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag in ("h1", "h2", "h3"):
            self._in_heading = False

    def handle_data(self, data):
        if self._skip:
            return
        self.parts.append(data)
        if self._in_heading:
            self.heading += data

    def text(self) -> str:
        text = html.unescape("".join(self.parts))
        text = re.sub(r"[ \t\u00a0]+", " ", text)
        return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def _epub(p: Path, data: bytes):
    import ebooklib
    from ebooklib import epub

    name = str(p)
    try:
        book = epub.read_epub(str(p), options={"ignore_ncx": True})
    except Exception:
        raise UserError(f"{name}: is corrupt or not an EPUB") from None
    toc_titles = {}

    def walk(items):
        for it in items:
            if isinstance(it, tuple):
                section, children = it
                if getattr(section, "href", None):
                    toc_titles.setdefault(section.href.split("#")[0], section.title)
                walk(children)
            elif getattr(it, "href", None):
                toc_titles.setdefault(it.href.split("#")[0], it.title)

    walk(book.toc)
    segments = []
    for idref, _ in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
            continue
        parser = _HTMLText()
        try:
            parser.feed(item.get_content().decode("utf-8", errors="replace"))
        except Exception:
            raise UserError(f"{name}: chapter {item.get_name()} is corrupt") from None
        text = parser.text()
        if not text:
            continue
        k = len(segments) + 1
        title = (toc_titles.get(item.get_name()) or (parser.heading or "").strip() or f"chapter {k}")
        segments.append(Segment(text, f"ch. {k}: {title}", {"chapter": k, "title": title}))
    meta = book.get_metadata("DC", "title")
    title = meta[0][0] if meta else ""
    return "epub", title, segments


_SPEAKER = re.compile(r"^\s*(?:-\s*)?([A-Z][\w .'-]{0,30}):\s+(.*)$", re.S)


def _cue(start: str, end: str, text: str, speaker: str | None) -> Segment:
    text = re.sub(r"<[^>]+>", "", text).strip()
    if speaker is None:
        m = _SPEAKER.match(text)
        if m:
            speaker, text = m.group(1).strip(), m.group(2).strip()
    stamp = start.split(".")[0].split(",")[0]
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
    return "srt", "", [_cue(str(s.start), str(s.end), s.text, None) for s in subs]


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
        voice = re.search(r"<v(?:\.[\w.]+)?\s+([^>]+)>", raw)
        segments.append(_cue(c.start, c.end, raw, voice.group(1).strip() if voice else None))
    return "vtt", "", segments


# ------------------------------------------------------------------ tokens and where they came from

class SourceMap:
    """token index -> char offset in Document.text -> segment (page / chapter / timestamp)."""

    def __init__(self, document: Document):
        self.document = document
        self._starts = np.asarray(document.segment_starts(), dtype=np.int64)
        self._chunks: list[np.ndarray] = []
        self._offsets: np.ndarray | None = np.zeros(0, dtype=np.int64)
        self._text: str | None = None

    def append(self, char_offsets) -> None:
        self._chunks.append(np.asarray(char_offsets, dtype=np.int64))
        self._offsets = None

    @property
    def offsets(self) -> np.ndarray:
        """[tokens] char offset of every token (-1 for prompt tokens outside the document)."""
        if self._offsets is None:
            self._offsets = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int64)
            self._chunks = [self._offsets]
        return self._offsets

    def __len__(self) -> int:
        return int(sum(len(c) for c in self._chunks)) if self._offsets is None else len(self._offsets)

    def char_offset(self, token: int) -> int:
        return int(self.offsets[token])

    def segment_of_chars(self, chars) -> np.ndarray:
        return np.maximum(np.searchsorted(self._starts, chars, side="right") - 1, 0)

    def locate(self, token: int) -> dict:
        c = self.char_offset(token)
        k = int(self.segment_of_chars(max(c, 0)))
        seg = self.document.segments[k]
        return {"token": int(token), "char": c, "segment": k, "label": seg.label, **seg.meta}

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.document.text
        return self._text

    def excerpt(self, token: int, radius_chars: int = 120) -> str:
        c = max(self.char_offset(token), 0)
        a, b = max(0, c - radius_chars), min(len(self.text), c + radius_chars)
        return ("…" if a else "") + " ".join(self.text[a:b].split()) + ("…" if b < len(self.text) else "")

    def labels_for(self, tokens) -> list[str]:
        chars = self.offsets[np.asarray(tokens, dtype=np.int64)]
        return [self.document.segments[k].label for k in self.segment_of_chars(np.maximum(chars, 0))]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"offsets": self.offsets}

    @classmethod
    def from_arrays(cls, document: Document, arrays: dict) -> "SourceMap":
        sm = cls(document)
        sm.append(arrays["offsets"])
        return sm


def _pieces(text: str, piece_chars: int) -> Iterator[tuple[int, str]]:
    """Cut text near every piece_chars at whitespace, so no word is split: (start, piece)."""
    at, n = 0, len(text)
    while at < n:
        end = min(n, at + piece_chars)
        if end < n:
            cut = max(text.rfind("\n", at + piece_chars // 2, end), text.rfind(" ", at + piece_chars // 2, end))
            if cut > at:
                end = cut  # the whitespace starts the next piece, where the tokenizer expects it
        yield at, text[at:end]
        at = end


def tokenize_stream(document: Document, tokenizer, piece_chars: int = 20000, prefix: str = "",
                    source_map: SourceMap | None = None) -> Iterator[list[int]]:
    """Yield token ids piece by piece (never the whole document at once), recording char offsets."""
    if prefix:
        ids = tokenizer(prefix, add_special_tokens=False).input_ids
        if source_map is not None:
            source_map.append(np.full(len(ids), -1, dtype=np.int64))
        yield ids
    text = document.text
    for start, piece in _pieces(text, piece_chars):
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=source_map is not None)
        if source_map is not None:
            source_map.append(start + np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64))
        yield enc["input_ids"]


def count_tokens(document: Document, tokenizer, piece_chars: int = 20000) -> int:
    return sum(len(ids) for ids in tokenize_stream(document, tokenizer, piece_chars))
