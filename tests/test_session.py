"""Sessions on the real model: snapshots, conversation modes, citations, section summaries."""

import json
import re

import pytest
import torch

from engine import documents
from engine.cache import CacheConfig
from engine.corpus import kjv_text
from engine.errors import UserError
from engine.session import ReadingSession
from engine.snapshots import manifest_checksum
from engine.grounding import main_names
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


def test_auto_stride_loads_a_snapshot_read_at_any_stride(read_session, smollm2, tmp_path):
    """A snapshot read on a GPU (stride 4,096) must load on a CPU (512) and back: "auto" takes the
    snapshot's stride, as cascades auto takes its cascades. An explicit other stride is still refused."""
    first = "".join(read_session.ask(QUESTION, max_new_tokens=12))
    base = read_session.save(tmp_path / "snap")  # read at stride 256
    auto = ReadingSession(smollm2, CONFIG)
    assert auto.stride == 512  # auto on the CPU
    auto.load(base)
    assert auto.stride == auto.engine.stride == 256
    assert "".join(auto.ask(QUESTION, max_new_tokens=12)) == first
    with pytest.raises(UserError, match="stride 256"):
        ReadingSession(smollm2, CONFIG, stride=512).load(base)
    refused = ReadingSession(smollm2, CacheConfig(sinks=64, window=512, cascades=4))  # auto, other window
    with pytest.raises(UserError, match="other cache settings"):
        refused.load(base)
    assert refused.stride == refused.engine.stride == 512  # a refused snapshot changes nothing


def test_snapshot_refuses_other_settings_and_models(read_session, smollm2, tmp_path):
    base = read_session.save(tmp_path / "snap")
    other = ReadingSession(smollm2, CacheConfig(sinks=64, window=512, cascades=4), stride=256)
    with pytest.raises(UserError, match="other cache settings"):
        other.load(base)
    manifest = json.loads((tmp_path / "snap.json").read_text())
    manifest["model_id"] = "someone-else"
    manifest["checksum"] = manifest_checksum(manifest)  # a valid manifest, just another model's
    (tmp_path / "snap.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="made with model someone-else"):
        ReadingSession(smollm2, CONFIG, stride=256).load(base)
    # a snapshot saved before an option existed was read with its default: it loads; another value does not
    manifest["model_id"] = smollm2.model_id
    for name in ("block", "cascade_sizes", "contest"):
        manifest["config"].pop(name)
    manifest["checksum"] = manifest_checksum(manifest)
    (tmp_path / "snap.json").write_text(json.dumps(manifest))
    ReadingSession(smollm2, CONFIG, stride=256).load(base)
    with pytest.raises(UserError, match="other cache settings"):
        ReadingSession(smollm2, CacheConfig(sinks=64, window=256, cascades=4, block=4), stride=256).load(base)
    with pytest.raises(UserError, match="other cache settings"):  # it was read with per-head contests
        ReadingSession(smollm2, CacheConfig(sinks=64, window=256, cascades=4, contest="layer"), stride=256).load(base)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a snapshot"):
        ReadingSession(smollm2, CONFIG, stride=256).load(tmp_path / "bad")
    with pytest.raises(UserError, match="no snapshot"):
        ReadingSession(smollm2, CONFIG, stride=256).load(tmp_path / "nothing")


def test_damaged_snapshots_are_refused_in_one_line_never_served(read_session, smollm2, tmp_path):
    """Bytes flipped across every file of a snapshot, and files cut at many offsets: loading gives a
    one-line UserError naming the file, or (a flip that changes nothing, e.g. JSON whitespace) the
    very same document; never a traceback, never a different answer served as if valid."""
    import random
    import shutil

    base = read_session.save(tmp_path / "good")
    files = [tmp_path / f"good{s}" for s in (".json", ".safetensors", ".index.sqlite")]
    reference = "".join(read_session.ask(QUESTION, max_new_tokens=8))
    rng = random.Random(0)
    cases = []
    for f in files:
        size = f.stat().st_size
        offsets = sorted({0, 1, size // 2, size - 1, *(rng.randrange(size) for _ in range(8))})
        cases += [(f, "flip", o) for o in offsets] + [(f, "cut", o) for o in offsets[::2]]
    refused = 0
    for f, how, offset in cases:
        work = tmp_path / "case"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for g in files:
            shutil.copy(g, work / g.name)
        data = bytearray((work / f.name).read_bytes())
        if how == "flip":
            data[offset] ^= 0x5A
        else:
            del data[offset:]
        (work / f.name).write_bytes(bytes(data))
        session = ReadingSession(smollm2, CONFIG, stride=256)
        try:
            session.load(work / "good")
        except UserError as e:
            refused += 1
            assert "\n" not in str(e) and "good" in str(e), (f.name, how, offset, str(e))
            continue
        assert "".join(session.ask(QUESTION, max_new_tokens=8)) == reference, (f.name, how, offset)
    assert refused >= len(cases) - 2  # only a harmless flip (JSON whitespace) may load
    # an interrupted save leaves a manifest that does not fit its tensors: refused
    other = ReadingSession(smollm2, CacheConfig(sinks=64, window=256, cascades=4), stride=256)
    other.read(documents.document_from_text(kjv_text(max_chars=2000, start_verse=300), title="other"))
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other.safetensors", tmp_path / "good.safetensors")
    with pytest.raises(UserError, match="good.safetensors: (does not match its manifest|tensor)"):
        ReadingSession(smollm2, CONFIG, stride=256).load(base)


def test_save_path_problems_are_one_line_errors(read_session, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        read_session.save(tmp_path / "a-file" / "snap")
    assert not list(tmp_path.glob(".*tmp*")) and not (tmp_path / "a-file").is_dir()


def test_questions_start_from_the_document_unless_continuing(read_session):
    seen = read_session.doc_cache.seen
    a = "".join(read_session.ask("What did God call the light?", max_new_tokens=10))
    b = "".join(read_session.ask("What did God call the light?", max_new_tokens=10))
    assert a == b and read_session.doc_cache.seen == seen  # the document's cache is untouched
    "".join(read_session.ask("And the darkness?", max_new_tokens=10, continue_conversation=True))
    assert read_session.doc_cache.seen == seen and len(read_session.turns) == 1  # the follow-up kept its turn


def test_section_summaries_cover_every_section(smollm2, monkeypatch):
    segments = [documents.Segment(kjv_text(max_chars=2500, start_verse=s), f"p. {k + 1}", {"page": k + 1})
                for k, s in enumerate((0, 400, 800))]
    doc = documents.Document(path=None, kind="pdf", title="three pages", segments=segments, sha256="x")
    assert [b[2] for b in section_bounds(doc, min_chars=2000)] == ["p. 1", "p. 2", "p. 3"]
    session = ReadingSession(smollm2, CONFIG, stride=256)
    grounded_in, source_names = [], session.source_names
    monkeypatch.setattr(session, "source_names", lambda text: grounded_in.append(text) or source_names(text))
    events = list(summarize_sections(session, doc, max_new_tokens=24, final_tokens=32))
    assert events[0]["type"] == "plan" and [s["source"] for s in events[0]["sections"]] == ["p. 1", "p. 2", "p. 3"]
    sections = [e for e in events if e["type"] == "section"]
    assert [s["label"] for s in sections] == ["p. 1", "p. 2", "p. 3"]
    assert all(s["summary"].strip() for s in sections)
    # each request named its own section's main names, in the order the section first uses them
    assert [s["names"] for s in sections] == [main_names(doc.text[s["start_char"]:s["end_char"]], doc.text)
                                              for s in sections]
    assert all(s["names"] for s in sections) and sections[0]["names"] != sections[2]["names"]
    status = [(e["index"], e["phase"]) for e in events if e["type"] == "status"]
    assert status == [(0, "reading"), (0, "summarizing"), (1, "reading"), (1, "summarizing"), (2, "reading"),
                      (2, "summarizing"), (3, "final"), (3, "final"), (3, "final")]
    # the summary of the whole document in parts, in the book's order, each labelled by the sections it spans
    parts = [(e["part"], e["parts"], e["label"]) for e in events if e["type"] == "status" and e["phase"] == "final"]
    assert [p[:2] for p in parts] == [(0, 3), (1, 3), (2, 3)]
    assert parts[0][2].startswith("p. 1") and parts[-1][2].endswith("p. 3")
    # each section may name only what its own text names, and each part what its own third of the book does
    own = [doc.text[s["start_char"]:s["end_char"]] for s in sections]
    assert len(grounded_in) == 6 and all(g.endswith(o) for g, o in zip(grounded_in, own))
    assert all(len(g) < len(o) + 40 for g, o in zip(grounded_in, own))  # the title and label, no more
    thirds = [g.removeprefix(f"{doc.title}\n") for g in grounded_in[3:]]
    at = [doc.text.find(t) for t in thirds]
    assert all(a >= 0 for a in at) and at == sorted(at) and at[0] < len(doc.text) // 3 < at[1] + len(thirds[1])
    assert all(len(t) < 0.6 * len(doc.text) for t in thirds)
    etas = [e["eta_seconds"] for e in events if e["type"] == "status"]
    assert etas[:2] == [None, None] and all(x is not None and x >= 0 for x in etas[2:])  # once one is timed
    assert events[-1]["type"] == "done" and events[-1]["summary"].strip()
    assert "".join(e["text"] for e in events if e["type"] == "delta").strip() == events[-1]["summary"]
    # afterwards the session holds the whole document, ready for questions
    assert session.read_result.doc_tokens > 1500
    assert "".join(session.ask("What is this about?", max_new_tokens=8)).strip()


def test_stopped_section_summary_keeps_finished_sections_and_the_session(smollm2):
    doc = documents.document_from_text("\n\n".join(f"Chapter {k + 1}\n" + kjv_text(max_chars=2200, start_verse=300 * k)
                                                   for k in range(3)), title="three chapters")
    session = ReadingSession(smollm2, CONFIG, stride=256)
    sections = []

    def stop():
        return len(sections) >= 1

    events = []
    for e in summarize_sections(session, doc, max_new_tokens=16, final_tokens=16, should_stop=stop):
        events.append(e)
        if e["type"] == "section":
            sections.append(e)
    assert [s["label"] for s in events[0]["sections"]] == ["Chapter 1", "Chapter 2", "Chapter 3"]
    assert events[-1] == {"type": "stopped", "sections": sections} and len(sections) == 1
    assert not any(e["type"] in ("delta", "done") for e in events)  # no final summary of a part of the book
    assert session.document is None  # the session keeps what it had: nothing was read into it


def test_cache_summary_is_written_in_parts_from_each_thirds_passages(read_session):
    n_answers, seen = len(read_session.answers), read_session.doc_cache.seen
    passages = read_session.index.passages
    assert len(passages) >= 3
    deltas = list(read_session.summarize(max_new_tokens=96))
    summary = read_session.answers[-1]
    assert len(read_session.answers) == n_answers + 1  # the parts are one answer
    assert "".join(deltas).split() == summary.text.split() and summary.text.strip()
    end = passages[-1].token_end
    thirds = {min(2, r["token_start"] * 3 // end) for r in summary.recalled}
    assert thirds == {0, 1, 2}  # each part re-read passages of its own third
    assert summary.first_token_seconds is not None and summary.seconds >= summary.first_token_seconds
    assert read_session.doc_cache.seen == seen  # memory stays as read


def test_each_cache_summary_part_may_name_only_its_own_thirds_names(read_session, monkeypatch):
    given, ask = [], read_session.ask

    def recording_ask(*args, **kwargs):  # the real ask; records which names each part was allowed
        given.append(kwargs["names"])
        asked.append(args[0])
        return ask(*args, **kwargs)

    asked = []
    monkeypatch.setattr(read_session, "ask", recording_ask)
    list(read_session.summarize(max_new_tokens=48))
    # prose is asked what happens in each part (a transcript, what each part says: SUMMARY_PART_QUESTION)
    assert [q.split(" of the document")[0] for q in asked] == [
        f"In one or two sentences, tell what happens in the {part}" for part in ("beginning", "middle", "end")]
    passages, text = read_session.index.passages, read_session.source_map.text
    end = passages[-1].token_end
    thirds = [[p for p in passages if k * end // 3 <= p.token_start < (k + 1) * end // 3] for k in range(3)]
    words = [set(re.findall(r"[a-z]+", text[t[0].char_start:t[-1].char_end].lower())) for t in thirds]
    allowed = set(re.findall(r"[a-z]+", ("Genesis " + read_session.format.question).lower()))  # title, turn words
    assert len(given) == 3
    for k, names in enumerate(given):
        others = set().union(*(words[j] for j in range(3) if j != k)) - words[k] - allowed  # only other thirds'
        assert others and not others & names.words
        assert words[k] <= names.words


def test_a_summary_part_cannot_repeat_a_phrase_of_the_parts_before_it(read_session):
    """The no-repeat n-grams span the parts written before (`written`); the repetition penalty does not."""
    tok = read_session.loaded.tokenizer
    before = tok("The document summarizes the story.", add_special_tokens=False).input_ids
    opening = tok("The document summarizes", add_special_tokens=False).input_ids
    the = tok(" the", add_special_tokens=False).input_ids[0]
    logits = torch.zeros(len(tok))
    fresh = read_session._processor(written=None)(opening, logits.clone())
    after = read_session._processor(written=before)(opening, logits.clone())
    assert fresh[the] == 0 and after[the] == float("-inf")  # "... summarizes the" was written before
    blocked = {tok.decode([i]) for i in after.isinf().nonzero().flatten().tolist()}
    assert {b.lower() for b in blocked} == {" the"}  # one n-gram blocked, in any capitals
    assert after[before[0]] == fresh[before[0]]  # and no penalty on the rest


def test_a_long_name_can_be_written_again_but_a_phrase_cannot(read_session):
    """No-repeat n-grams skip a word's inner pieces: " Elimelech" is 4 pieces, and the 4-gram rule had let a
    summary write it once, then only "Elimelec" or "Elimelechs"."""
    tok = read_session.loaded.tokenizer
    before = tok("Naomi's husband Elimelech went to Moab.", add_special_tokens=False).input_ids
    name = tok(" Elimelech", add_special_tokens=False).input_ids
    assert len(name) >= 4
    logits = torch.zeros(len(tok))
    again = read_session._processor(written=before)(tok(" Then", add_special_tokens=False).input_ids + name[:-1],
                                                   logits.clone())
    assert again[name[-1]] == 0  # the name can be finished
    phrase = tok(" husband Elimelech went", add_special_tokens=False).input_ids
    loop = read_session._processor(written=before)(phrase[:-1], logits.clone())
    assert loop[phrase[-1]] == float("-inf")  # the words after it cannot repeat the phrase


def test_an_answer_meets_the_repetition_penalty_only_after_its_first_words(read_session):
    """An answer's penalty applies once it has `repetition_penalty_from` tokens (its first words may
    repeat the question's); a summary's applies from its first token."""
    tok = read_session.loaded.tokenizer
    a = read_session.answering
    assert a.repetition_penalty > 1.0 and a.repetition_penalty_from > 1
    son = tok(" son", add_special_tokens=False).input_ids[0]
    logits = torch.full((len(tok),), 2.0)
    early = [son] + list(range(1000, 1000 + a.repetition_penalty_from - 2))  # one token short, no n-gram twice
    late = early + [5000]
    assert read_session._processor()(early, logits.clone())[son] == 2.0  # free
    assert read_session._processor()(late, logits.clone())[son] == pytest.approx(2.0 / a.repetition_penalty)
    assert read_session._processor(summary=True)([son, 1000], logits.clone())[son] == \
        pytest.approx(2.0 / a.summary_repetition_penalty)


def test_a_summary_cannot_copy_a_long_run_of_its_source(read_session):
    """The copy guard (`summary_copy_tokens`): after 11 tokens copied from the source the 12th that
    would continue the copy is ruled out; answers (no `no_copy` ids) may quote."""
    tok = read_session.loaded.tokenizer
    source = tok("[00:01:51] Maya: Welcome back to Harbor Notes, and with me as always is Tomas.",
                 add_special_tokens=False).input_ids
    n = read_session.answering.summary_copy_tokens
    assert n == 12 and len(source) > n
    logits = torch.zeros(len(tok))
    copying = read_session._processor(no_copy=source)(source[: n - 1], logits.clone())
    quoting = read_session._processor()(source[: n - 1], logits.clone())
    assert copying[source[n - 1]] == float("-inf") and quoting[source[n - 1]] == 0
    assert int(copying.isinf().sum()) == int(quoting.isinf().sum()) + 1  # that one token, nothing else


def test_cache_summary_parts_may_not_copy_their_passages(read_session, monkeypatch):
    given, ask = [], read_session.ask

    def recording_ask(*args, **kwargs):  # the real ask; records each part's passages and that it is a summary's
        given.append((kwargs["summary"], kwargs["passages"]))
        return ask(*args, **kwargs)

    monkeypatch.setattr(read_session, "ask", recording_ask)
    list(read_session.summarize(max_new_tokens=48))
    assert len(given) == 3
    for summary_part, passages in given:
        assert summary_part and passages and "\n".join(r.text for r in passages).strip()
    summary = read_session.answers[-1].text.split()
    for _, passages in given:
        source = " ".join("\n".join(r.text for r in passages).split())
        assert not any(" ".join(summary[i: i + 12]) in source for i in range(len(summary) - 11))


def test_no_phrase_comes_back_in_other_capitals(read_session):
    """A section summary looped on "the LORD is the one", "THE LORD IS THE ONE", "the Lord is the One"."""
    tok = read_session.loaded.tokenizer
    ids = tok("The LORD is the one who gives life. THE LORD IS THE", add_special_tokens=False).input_ids
    logits = read_session._processor()(ids, torch.zeros(len(tok)))
    for again in (" one", " ONE", " One"):
        assert logits[tok(again, add_special_tokens=False).input_ids[0]] == float("-inf"), again
    assert logits[tok(" king", add_special_tokens=False).input_ids[0]] == 0  # anything else stays


def test_a_cache_summary_of_fewer_passages_than_parts_is_one_summary(smollm2):
    session = ReadingSession(smollm2, CONFIG, stride=256)
    session.read(documents.document_from_text(kjv_text(max_chars=400), title="Genesis"))
    assert len(session.index.passages) < 3
    text = "".join(session.summarize(max_new_tokens=24))
    assert session.answers[-1].text == text and len(session.answers) == 1


def test_a_base_models_stream_never_shows_the_turn_word_its_answer_drops():
    from engine.session import visible_text

    stream = ["Jonah went", "Jonah went to Nineveh.\n", "Jonah went to Nineveh.\nQuest",
              "Jonah went to Nineveh.\nQuestion:", "Jonah went to Nineveh.\nQuestion: Who"]
    shown = [visible_text(t, plain=True) for t in stream]
    assert shown[:3] == [("Jonah went", False), ("Jonah went to Nineveh.", False), ("Jonah went to Nineveh.", False)]
    assert shown[3] == shown[4] == ("Jonah went to Nineveh.", True)
    assert visible_text("Question: why?\nQuest", plain=False) == ("Question: why?\nQuest", False)  # chat: no turn word
    # a markup tag at a line start ends any answer (the prompt's scaffold again, or web-page code)
    for plain in (True, False):
        assert visible_text("Jonah was angry.\n\n<doc", plain) == ("Jonah was angry.", True)
        assert visible_text("Jonah was angry.\n</document>", plain) == ("Jonah was angry.", True)
        assert visible_text("Jonah prayed.\n  <script>\n  const", plain) == ("Jonah prayed.", True)
        assert visible_text("Jonah was angry.\n<", plain) == ("Jonah was angry.", False)  # held back
        assert visible_text("Jonah was angry.\n", plain) == ("Jonah was angry.", False)
        assert visible_text("Jonah was angry.\nThen", plain) == ("Jonah was angry.\nThen", False)
        assert visible_text("a <document> in a line", plain) == ("a <document> in a line", False)
        assert visible_text("one\n< two\n<3", plain) == ("one\n< two\n<3", False)  # not a tag


def test_a_prompt_is_read_without_score_sums_and_only_a_cited_answer_counts(tiny, monkeypatch):
    """Citations count the answer's attention only, so the prompt (recalled passages, question) is read
    on the fast path without score sums; the answer's tokens are scored only when citations are asked."""
    from engine import kernels

    session = ReadingSession(tiny, CacheConfig(sinks=8, window=64), stride=64)
    session.read(documents.document_from_text(kjv_text()[:6000], "kjv"))
    seen, attend = [], kernels.chunk_attention

    def recording(q, *args, weights=None, **kwargs):
        seen.append((q.shape[2], weights is not None))
        return attend(q, *args, weights=weights, **kwargs)

    monkeypatch.setattr(kernels, "chunk_attention", recording)
    layers = tiny.model.config.num_hidden_layers
    for n_citations in (3, 0):
        seen.clear()
        "".join(session.ask("Who made the heaven and the earth?", max_new_tokens=4, n_citations=n_citations))
        answer = session.answers[-1]
        assert answer.tokens == 4  # greedy on a random model: no end of turn in 4 tokens
        cut = len(seen) - layers * (answer.tokens - 1)  # the last token's logits are never needed
        prompt, decode = seen[:cut], seen[cut:]
        assert sum(rows for rows, _ in prompt) > layers and not any(scored for _, scored in prompt)
        assert decode and all(rows == 1 and scored == (n_citations > 0) for rows, scored in decode)
        assert bool(answer.citations) == (n_citations > 0)
