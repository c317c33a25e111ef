"""Ingestion on real files the tests make themselves (PyMuPDF writes PDFs, ebooklib writes EPUBs)."""

import tracemalloc

import pymupdf
import pytest

from engine import documents
from engine.documents import SourceMap, count_tokens, load_document, tokenize_stream
from engine.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def make_pdf(path, pages):
    doc = pymupdf.open()
    for text in pages:
        page = doc.new_page()
        page.insert_textbox(pymupdf.Rect(50, 50, 550, 800), text, fontsize=11)
    doc.save(str(path))
    doc.close()


PAGES = [
    "Chapter one. The harbour town woke slowly under a grey sky.",
    "The fishermen counted their nets and argued about the weather.",
    "On the third day the mayor announced that the lighthouse keeper is named Oswin Tull.",
    "The story ends with a storm and a long quiet morning.",
]


def test_pdf_pages_and_source_map(tmp_path, tokenizer):
    make_pdf(tmp_path / "book.pdf", PAGES)
    doc = load_document(tmp_path / "book.pdf")
    assert doc.kind == "pdf" and [s.label for s in doc.segments] == ["p. 1", "p. 2", "p. 3", "p. 4"]
    assert "Oswin Tull" in doc.segments[2].text
    sm = SourceMap(doc)
    ids = [i for piece in tokenize_stream(doc, tokenizer, source_map=sm) for i in piece]
    assert len(sm) == len(ids)
    at = doc.text.index("Oswin")
    token = int((sm.offsets <= at).nonzero()[0][-1])
    loc = sm.locate(token)
    assert loc["page"] == 3 and loc["label"] == "p. 3" and "Oswin" in sm.excerpt(token)
    assert sm.labels_for([0, token]) == ["p. 1", "p. 3"]


def test_citation_names_the_page_of_the_fact(tmp_path, smollm2):
    from engine.cache import CacheConfig
    from engine.session import ReadingSession

    make_pdf(tmp_path / "book.pdf", PAGES)
    session = ReadingSession(smollm2, CacheConfig(sinks=64, window=256, cascades=4), stride=128)
    session.read(load_document(tmp_path / "book.pdf"))
    answer = "".join(session.ask("What is the name of the lighthouse keeper?", max_new_tokens=12, n_citations=3))
    assert "Oswin" in answer or "Tull" in answer, answer
    assert "p. 3" in [c.label for c in session.answers[-1].citations]


def test_tokenize_stream_round_trips_text(tmp_path, tokenizer):
    text = ("Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. " * 300 + "\n\n") * 3
    doc = documents.document_from_text(text)
    sm = SourceMap(doc)
    pieces = list(tokenize_stream(doc, tokenizer, piece_chars=1000, source_map=sm))
    assert len(pieces) > 20
    decoded = "".join(tokenizer.decode(p) for p in pieces)
    assert decoded == doc.text
    ids = [i for p in pieces for i in p]
    checked = 0
    for t in range(0, len(sm), 37):  # each token's offset points at its own text
        piece = tokenizer.decode([ids[t]])
        if "\ufffd" in piece:  # part of a multi-byte character: no text of its own
            continue
        off = sm.char_offset(t)
        assert doc.text[off:off + len(piece)] == piece, (t, piece)
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("name,data,needle", [
    ("empty.txt", b"", "is empty"),
    ("blank.md", b"   \n\n  ", "is empty"),
    ("image.pdf", bytes.fromhex("89504e470d0a1a0a") + b"\x00" * 64, "not a PDF"),
    ("truncated.pdf", None, "corrupt"),
    ("binary.txt", bytes(range(256)) * 4, "not a text file"),
    ("notes.docx", b"hello", "unsupported file type"),
])
def test_bad_files_give_clear_errors(tmp_path, name, data, needle):
    path = tmp_path / name
    if data is None:  # a real PDF cut in half
        make_pdf(tmp_path / "full.pdf", PAGES)
        full = (tmp_path / "full.pdf").read_bytes()
        data = full[: len(full) // 3]
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        load_document(path)
    assert needle in str(e.value) and name in str(e.value) and "\n" not in str(e.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_document(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="directory"):
        load_document(tmp_path)


def test_encrypted_and_image_only_pdfs(tmp_path):
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret plans")
    doc.save(str(tmp_path / "locked.pdf"), encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="owner")
    doc.close()
    with pytest.raises(UserError, match="encrypted"):
        load_document(tmp_path / "locked.pdf")
    img = pymupdf.open()
    page = img.new_page()
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 64, 64), False)
    pix.clear_with(200)
    page.insert_image(pymupdf.Rect(50, 50, 300, 300), pixmap=pix)
    img.save(str(tmp_path / "scan.pdf"))
    img.close()
    with pytest.raises(UserError, match="no text layer"):
        load_document(tmp_path / "scan.pdf")


def test_text_encodings(tmp_path):
    text = "Café au lait, naïve façade, jalapeño — déjà vu.\n" * 20
    (tmp_path / "latin1.txt").write_bytes(text.replace("—", "-").encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes(text.encode("utf-16"))
    (tmp_path / "crlf.md").write_bytes(("# Title here\r\n" + text).encode("utf-8"))
    assert load_document(tmp_path / "latin1.txt").text == text.replace("—", "-")
    assert load_document(tmp_path / "utf16.txt").text == text
    md = load_document(tmp_path / "crlf.md")
    assert md.title == "Title here" and "\r" not in md.text and md.kind == "md"


def test_srt_with_speakers(tmp_path):
    (tmp_path / "talk.srt").write_text(
        "1\n00:00:01,000 --> 00:00:04,000\nAlice: Welcome to the meeting.\n\n"
        "2\n00:01:02,500 --> 00:01:05,000\nBob: The budget is due on Friday.\n\n"
        "3\n00:01:06,000 --> 00:01:08,000\n(applause)\n\n")
    doc = load_document(tmp_path / "talk.srt")
    assert [s.label for s in doc.segments] == ["00:00:01 Alice", "00:01:02 Bob", "00:01:06"]
    assert doc.segments[1].text == "[00:01:02] Bob: The budget is due on Friday."
    assert doc.segments[1].meta["speaker"] == "Bob"


def test_vtt_with_cues_and_voices(tmp_path):
    (tmp_path / "lecture.vtt").write_text(
        "WEBVTT\n\n00:00:00.000 --> 00:00:03.000\n<v Dr. Lee>Today we study tides.\n\n"
        "00:00:03.500 --> 00:00:06.000\nThe moon pulls the oceans.\n")
    doc = load_document(tmp_path / "lecture.vtt")
    assert doc.kind == "vtt" and len(doc.segments) == 2
    assert doc.segments[0].text == "[00:00:00] Dr. Lee: Today we study tides."
    assert doc.segments[1].label == "00:00:03" and "moon" in doc.segments[1].text


def test_epub_chapters_and_titles(tmp_path):
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("id1")
    book.set_title("Two Chapters")
    book.set_language("en")
    chapters = []
    for k, (title, body) in enumerate([("The Storm", "Rain fell on the roofs."), ("The Calm", "The sea was flat.")]):
        c = epub.EpubHtml(title=title, file_name=f"c{k}.xhtml", lang="en")
        c.content = f"<html><body><h1>{title}</h1><p>{body}</p></body></html>"
        book.add_item(c)
        chapters.append(c)
    book.toc = chapters
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = chapters
    epub.write_epub(str(tmp_path / "book.epub"), book)
    doc = load_document(tmp_path / "book.epub")
    assert doc.title == "Two Chapters" and doc.kind == "epub"
    assert [s.label for s in doc.segments] == ["ch. 1: The Storm", "ch. 2: The Calm"]
    assert "Rain fell on the roofs." in doc.segments[0].text


def test_long_real_text_streams_with_bounded_memory(tmp_path, tokenizer):
    from engine.corpus import kjv_text

    text = kjv_text(max_chars=1_200_000)  # ~300k tokens of the KJV
    (tmp_path / "kjv.txt").write_text(text)
    doc = load_document(tmp_path / "kjv.txt")
    tracemalloc.start()
    total, largest = 0, 0
    for piece in tokenize_stream(doc, tokenizer, piece_chars=20000):
        total += len(piece)
        largest = max(largest, len(piece))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 250_000 and largest < 8000  # many bounded pieces, never the whole book at once
    # holding every id as a Python list would take > 8 MB; streaming stays far below that
    assert peak < 4 * len(text), peak
    assert count_tokens(doc, tokenizer) == total
