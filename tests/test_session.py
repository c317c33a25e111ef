"""Sessions on the real model: snapshots, conversation modes, citations, section summaries."""

import json

import pytest

from engine import documents
from engine.cache import CacheConfig
from engine.corpus import kjv_text
from engine.errors import UserError
from engine.session import ReadingSession
from engine.summaries import section_bounds, summarize_sections

pytestmark = pytest.mark.real_model

CONFIG = CacheConfig(sinks=64, window=256, cascades=4)
QUESTION = "Who created the heaven and the earth?"


@pytest.fixture(scope="module")
def read_session(smollm2):
    session = ReadingSession(smollm2, CONFIG, stride=256)
    session.read(documents.document_from_text(kjv_text(max_chars=5000), title="Genesis"))
    return session


def test_snapshot_round_trip_gives_identical_answers(read_session, smollm2, tmp_path):
    first = "".join(read_session.ask(QUESTION, max_new_tokens=12))
    cites = [(c.token, c.label) for c in read_session.answers[-1].citations]
    base = read_session.save(tmp_path / "snap")
    manifest = json.loads((tmp_path / "snap.json").read_text())
    assert manifest["model_id"] == smollm2.model_id and manifest["document"]["sha256"]
    loaded = ReadingSession(smollm2, CONFIG, stride=256)
    loaded.load(base)
    assert loaded.read_result == read_session.read_result
    again = "".join(loaded.ask(QUESTION, max_new_tokens=12))
    assert again == first and first.strip()
    assert [(c.token, c.label) for c in loaded.answers[-1].citations] == cites


def test_snapshot_refuses_other_settings_and_models(read_session, smollm2, tmp_path):
    base = read_session.save(tmp_path / "snap")
    other = ReadingSession(smollm2, CacheConfig(sinks=64, window=512, cascades=4), stride=256)
    with pytest.raises(UserError, match="other cache settings"):
        other.load(base)
    manifest = json.loads((tmp_path / "snap.json").read_text())
    manifest["model_id"] = "someone-else"
    (tmp_path / "snap.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="made with model someone-else"):
        ReadingSession(smollm2, CONFIG, stride=256).load(base)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a snapshot"):
        ReadingSession(smollm2, CONFIG, stride=256).load(tmp_path / "bad")
    with pytest.raises(UserError, match="no snapshot"):
        ReadingSession(smollm2, CONFIG, stride=256).load(tmp_path / "nothing")


def test_questions_start_from_the_document_unless_continuing(read_session):
    seen = read_session.doc_cache.seen
    a = "".join(read_session.ask("What did God call the light?", max_new_tokens=10))
    b = "".join(read_session.ask("What did God call the light?", max_new_tokens=10))
    assert a == b and read_session.doc_cache.seen == seen  # the document's cache is untouched
    "".join(read_session.ask("And the darkness?", max_new_tokens=10, continue_conversation=True))
    assert read_session.doc_cache.seen == seen and len(read_session.turns) == 1  # the follow-up kept its turn


def test_section_summaries_cover_every_section(smollm2):
    segments = [documents.Segment(kjv_text(max_chars=2500, start_verse=s), f"p. {k + 1}", {"page": k + 1})
                for k, s in enumerate((0, 400, 800))]
    doc = documents.Document(path=None, kind="pdf", title="three pages", segments=segments, sha256="x")
    assert [b[2] for b in section_bounds(doc, 2000)] == ["p. 1", "p. 2", "p. 3"]
    session = ReadingSession(smollm2, CONFIG, stride=256)
    events = list(summarize_sections(session, doc, section_chars=2000, max_new_tokens=24, final_tokens=32))
    sections = [e for e in events if e["type"] == "section"]
    assert [s["label"] for s in sections] == ["p. 1", "p. 2", "p. 3"]
    assert all(s["summary"].strip() for s in sections)
    assert events[-1]["type"] == "done" and events[-1]["summary"].strip()
    assert "".join(e["text"] for e in events if e["type"] == "delta").strip() == events[-1]["summary"]
    # afterwards the session holds the whole document, ready for questions
    assert session.read_result.doc_tokens > 1500
    assert "".join(session.ask("What is this about?", max_new_tokens=8)).strip()
