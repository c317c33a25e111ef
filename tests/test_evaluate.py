"""Evaluation harness: scoring, needle placement, retention, resumable grids and written reports."""

import json
import math
import random

import pytest

from engine import evaluate
from engine.cache import CacheConfig
from engine.evaluate import (
    DEPTH_BANDS,
    digits_score,
    passkey_draw,
    passkey_prompt,
    qa_score,
)

# ------------------------------------------------------------------ scoring

@pytest.mark.parametrize("answer,key,exact,per_digit", [
    (" 12345.\n", "12345", True, 1.0),
    ("The pass key is 12395", "12345", False, 0.8),
    ("no digits at all", "12345", False, 0.0),
    (" 1234.", "12345", False, 0.8),  # a missing digit is wrong, the others are compared in place
    (" 123456", "12345", False, 1.0),  # too long: not exact, but every key digit is in place
    (" 54321", "12345", False, 0.2),  # digits present but out of place
    (" 2345", "12345", False, 0.0),  # shifted by one: position-wise, nothing matches
    ("is 98765, not 12345", "12345", False, 0.2),  # the first number is the answer
])
def test_digit_scores(answer, key, exact, per_digit):
    got_exact, got_digits = digits_score(answer, key)
    assert got_exact is exact and got_digits == pytest.approx(per_digit)


@pytest.mark.parametrize("answer,word,correct,exact", [
    ('The special word for Genesis 3:5 is "knowing".', "knowing", True, True),
    ("KNOWING", "knowing", True, True),
    ("The words are knowing, serpent and garden.", "knowing", True, False),  # lists other facts' words
    ("foreknowing", "knowing", False, False),  # whole words only
    ("The special word is serpent.", "knowing", False, False),
])
def test_qa_scores(answer, word, correct, exact):
    assert qa_score(answer, word, ["knowing", "serpent", "garden"]) == (correct, exact)


# ------------------------------------------------------------------ needle placement

@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.mark.parametrize("haystack,needle", [("filler", "ours"), ("kjv", "ours"), ("filler", "repeated")])
@pytest.mark.parametrize("band", range(len(DEPTH_BANDS)))
def test_needle_lands_in_its_depth_band(tokenizer, haystack, needle, band):
    depth, key, offset = passkey_draw(0, 1500, band, 0)
    lo, hi = DEPTH_BANDS[band]
    assert lo <= depth <= hi and len(key) == 5 and key.isdigit()
    ids, at, n_needle = passkey_prompt(tokenizer, 1500, depth, key, haystack, start=offset, needle=needle)
    assert len(ids) == 1500
    body = len(ids) - n_needle
    slack = 0.01 if haystack == "filler" else 0.05  # needles go between sentences / verses
    assert lo - slack <= at / body <= hi + slack
    needle_text = tokenizer.decode(ids[at:at + n_needle])
    assert needle_text.strip() == evaluate.NEEDLES[needle].format(key=key)
    times = {"ours": 2, "repeated": 6}[needle]
    assert tokenizer.decode(ids).count(key) == times  # the key occurs in the needle only
    digits = "".join(ch for t in ids[at:at + n_needle] for ch in tokenizer.decode([t]) if ch.isdigit())
    assert digits == key * times  # the key's digits are in the token stream, in order


def test_case_draws_depend_only_on_their_coordinates():
    a = passkey_draw(0, 640, 2, 0)
    assert passkey_draw(0, 640, 2, 0) == a
    assert len({passkey_draw(0, 640, b, 0)[1] for b in range(5)} | {passkey_draw(1, 640, 2, 0)[1]}) == 6


def test_qa_facts_sit_at_their_depths_and_come_from_their_verses(tokenizer):
    from engine.corpus import kjv_verses

    verses = kjv_verses()
    depths = [0.1, 0.5, 0.9]
    text, items = evaluate.qa_document(verses, tokenizer, 1200, depths, random.Random(3))
    lines = text.split("\n")
    n_tokens = len(tokenizer(text).input_ids)
    assert 1100 < n_tokens <= 1210
    for it in items:
        fact = f'Remember: the special word for {it["ref"]} is "{it["word"]}".'
        k = lines.index(fact)
        assert abs(k / len(lines) - it["depth"]) < 0.05
        verse = next(v for v in verses if f"{v.book} {v.chapter}:{v.verse}" == it["ref"] and v.text == lines[k - 1])
        assert it["word"] in verse.text.lower()
    assert len({it["word"] for it in items}) == len(items)


def test_sign_test_is_the_exact_two_sided_binomial():
    from math import comb

    assert evaluate.sign_test(9, 0) == 2 / 2 ** 9  # all nine discordant cases one way
    assert evaluate.sign_test(7, 5) == evaluate.sign_test(5, 7) == 2 * sum(comb(12, i) for i in range(6)) / 2 ** 12
    assert evaluate.sign_test(5, 5) == 1.0 and evaluate.sign_test(0, 0) == 1.0  # no evidence either way


def test_book_questions_are_answered_by_their_cited_verses_and_never_by_genesis():
    """Every hand-written question of assets/eval/books_qa.json: unique id, each cited verse exists,
    an accepted answer occurs as whole words in a cited verse, and no question is on Genesis (kept
    for the independent check)."""
    from engine.corpus import kjv_verses
    from engine.eval_books import correct, load_set

    data = load_set()
    rows = {(v.book, v.chapter, v.verse): v.text for v in kjv_verses()}
    items = data["questions"] + data["bible"]
    assert len({it["id"] for it in items}) == len(items) and len(data["bible"]) >= 70
    for it in items:
        assert it["book"] != "Genesis", it["id"]
        cited = [rows[(it["book"], c, v)] for c, v in it["refs"]]  # KeyError: a verse that does not exist
        assert any(correct(text, it["answers"]) for text in cited), it["id"]


# ------------------------------------------------------------------ runs on a tiny random Llama

def eval_args(tmp_path, task, *extra):
    import argparse

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args([task, "--out", str(tmp_path), "--window", "32", "--sinks", "16", "--stride", "32",
                              "--dtype", "float32", *extra])


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_wires_the_eval_subcommands():
    from engine.cli import build_parser

    args = build_parser().parse_args(["eval", "passkey", "--lengths-x", "1", "2", "--policies", "sink"])
    assert (args.task, args.lengths_x, args.policies) == ("passkey", [1.0, 2.0], ["sink"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "passkey", "--policies", "h2o"])


def test_needle_retention_measures_eviction(use_tiny):
    from engine.runtime import Engine

    tok = use_tiny.tokenizer
    engine = Engine(use_tiny, CacheConfig(policy="sink", sinks=4, window=32, cascades=1), stride=32)
    for depth, expected in ((0.0, 0.0), (1.0, 1.0)):  # evicted long ago / still in the window
        ids, at, n = passkey_prompt(tok, 300, depth, "12345")
        cache = engine.new_cache()
        engine.read([ids], cache)
        digit_pos = [at + i for i, t in enumerate(ids[at:at + n]) if tok.decode([t]).strip().isdigit()]
        assert digit_pos and evaluate.needle_retention(cache, digit_pos) == expected
    full = Engine(use_tiny, CacheConfig(policy="full"), stride=32)
    cache = full.new_cache()
    full.read([ids], cache)
    assert evaluate.needle_retention(cache, [0, 1, 2]) == 1.0


def test_passkey_grid_is_resumable_and_reported(tmp_path, use_tiny):
    # 112 + 16 = 128 slots; 1x is a whole prompt (prefix, haystack, question, answer) of 128 tokens
    args = eval_args(tmp_path, "passkey", "--window", "112", "--samples", "1", "--lengths-x", "1", "2",
                     "--policies", "cascade", "sink", "full")
    evaluate.run_passkey(args)
    rows = jsonl(tmp_path / "passkey.jsonl")
    assert len(rows) == 3 * 2 * len(DEPTH_BANDS)
    assert {(r["case"]["policy"], r["case"]["length"]) for r in rows} == {
        (p, n) for p in ("cascade", "sink", "full") for n in (128, 256)}
    for r in rows:
        assert {"exact", "per_digit", "answer", "key", "needle_kept", "needle_kept_read"} <= set(r)
        assert (r["exact"], r["per_digit"]) == digits_score(r["answer"], r["key"])
        lo, hi = DEPTH_BANDS[r["case"]["band"]]
        assert lo - 0.15 <= r["depth"] <= hi + 0.15  # short haystacks: sentence granularity
        if r["case"]["length"] == 128:  # a true 1x: nothing was evicted when the answer started
            assert r["needle_kept"] == 1.0 and r["cascades_used"] in (1, None)
        else:  # cascades auto: the cascade's span reaches the whole prompt
            assert r["case"]["policy"] != "cascade" or r["span"] >= 256
    before = (tmp_path / "passkey.jsonl").read_text()
    evaluate.run_passkey(args)  # nothing left to do: no case runs twice
    assert (tmp_path / "passkey.jsonl").read_text() == before
    evaluate.run_passkey(eval_args(tmp_path, "passkey", "--window", "112", "--samples", "1", "--lengths-x", "1", "2",
                                   "4", "--policies", "cascade"))
    rows = jsonl(tmp_path / "passkey.jsonl")  # a bigger grid only adds its missing cases
    assert len(rows) == 3 * 2 * len(DEPTH_BANDS) + len(DEPTH_BANDS)
    assert len({json.dumps(r["case"], sort_keys=True) for r in rows}) == len(rows)
    # the same grid with another setting is a different experiment: it runs again
    evaluate.run_passkey(eval_args(tmp_path, "passkey", "--window", "112", "--samples", "1", "--lengths-x", "1",
                                   "--policies", "sink", "--stride", "16"))
    assert len(jsonl(tmp_path / "passkey.jsonl")) == 3 * 2 * len(DEPTH_BANDS) + 2 * len(DEPTH_BANDS)
    summary = json.loads((tmp_path / "passkey.json").read_text())
    assert {(c["policy"], c["length"]) for c in summary["by_length"]} == {("sink", 128)}  # only this run's settings
    evaluate.run_passkey(eval_args(tmp_path, "passkey", "--window", "112", "--samples", "1", "--lengths-x", "1",
                                   "--policies", "sink", "--stride", "16", "--beta", "0.99"))  # an ablation is a new experiment too
    assert len(jsonl(tmp_path / "passkey.jsonl")) == 3 * 2 * len(DEPTH_BANDS) + 3 * len(DEPTH_BANDS)
    evaluate.run_passkey(eval_args(tmp_path, "passkey", "--window", "112", "--samples", "1", "--lengths-x", "1",
                                   "--policies", "sink", "--stride", "16"))
    summary = json.loads((tmp_path / "passkey.json").read_text())  # whose rows stay out of the default's summary
    assert [c["n"] for c in summary["cells"]] == [1] * len(DEPTH_BANDS)
    for name in ("passkey.json", "passkey.png", "passkey.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"


def test_passkey_with_recall_runs_through_the_session_and_is_reported_apart(tmp_path, use_tiny):
    # the same grid with --recall on off: the on rows are read and asked through ReadingSession
    args = eval_args(tmp_path, "passkey", "--window", "112", "--samples", "1", "--lengths-x", "2",
                     "--policies", "cascade", "--recall", "on", "off", "--recall-tokens", "320")
    evaluate.run_passkey(args)
    rows = jsonl(tmp_path / "passkey.jsonl")
    on = [r for r in rows if r["case"].get("recall") == "on"]
    assert len(on) == len(rows) - len(on) == len(DEPTH_BANDS)
    for r in on:
        assert r["case"]["recall_tokens"] == 320 and 0 < r["recalled_tokens"] <= 320
        assert r["hit"] == any(r["key"] in p for p in r["recalled_text"])  # keys are the haystack's only digits
        assert (r["exact"], r["per_digit"]) == digits_score(r["answer"], r["key"])
    md = (tmp_path / "passkey.md").read_text()
    assert "| cascade | " in md and "| cascade+recall | " in md
    evaluate.run_passkey(args)  # resumable: nothing runs twice
    assert len(jsonl(tmp_path / "passkey.jsonl")) == len(rows)


def test_passkey_report_tables(tmp_path):
    settings = {"model": "m", "dtype": "float32", "prompt": "plain", "haystack": "filler", "sinks": 16,
                "window": 32, "stride": 32, "cascades": 4}
    rows = [{"case": {"policy": p, "length": n, "band": b, "sample": 0}, "exact": e, "per_digit": d,
             "needle_kept": 0.5}
            for p, n, b, e, d in [("cascade", 48, 0, True, 1.0), ("cascade", 48, 1, False, 0.4),
                                  ("sink", 48, 0, False, 0.2), ("sink", 96, 0, True, 1.0)]]
    summary = evaluate.summarize_passkey(rows, tmp_path, "m", settings)
    md = (tmp_path / "passkey.md").read_text()
    lo, hi = evaluate.wilson(1, 2)
    assert f"| cascade | 0.50 [{lo:.2f}-{hi:.2f}] (0.70), n=2 | - |" in md
    lo, hi = evaluate.wilson(1, 1)
    assert f"| sink | 0.00 [0.00-{evaluate.wilson(0, 1)[1]:.2f}] (0.20), n=1 | 1.00 [{lo:.2f}-1.00] (1.00), n=1 |" in md
    rows[0]["needle_kept"], rows[3]["needle_kept"], rows[2]["needle_kept"] = 1.0, 1.0, 0.0
    evaluate.summarize_passkey(rows, tmp_path, "m", settings)
    md = (tmp_path / "passkey.md").read_text()
    assert "| cascade | 1 / 1 | 0 / 1 | 0 / 0 |" in md and "| sink | 1 / 1 | 0 / 0 | 0 / 1 |" in md
    by = {(c["policy"], c["length"]): c for c in summary["by_length"]}
    assert by[("cascade", 48)]["exact"] == 0.5 and by[("sink", 96)]["per_digit"] == 1.0


def test_ppl_reports_every_policy(tmp_path, use_tiny):
    args = eval_args(tmp_path, "ppl", "--tokens", "300", "--bucket", "128", "--window", "128")
    summary = evaluate.run_ppl(args)
    rows = {r["case"]["policy"]: r for r in jsonl(tmp_path / "ppl.jsonl")}
    assert set(rows) == {"cascade", "sink", "full"}
    log_vocab = math.log(len(use_tiny.tokenizer))
    for r in rows.values():  # a random model: NLL near log(vocab), and finite
        assert 0.5 * log_vocab < r["nll"] < 2 * log_vocab
        assert r["case"]["tokens"] == 300 and len(r["sums"]) == 3
        assert evaluate.range_nll(r, 0, 300) == pytest.approx(r["nll"])
    # before the 144-slot caches are full, every policy sees the same context: same predictions
    first = [evaluate.range_nll(r, 0, 128) for r in rows.values()]
    assert max(first) - min(first) < 1e-4
    assert [r["policy"] for r in summary["rows"]] == ["cascade", "sink", "full"]
    assert "| full | all | 300 |" in (tmp_path / "ppl.md").read_text()
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    evaluate.run_ppl(args)
    assert len(jsonl(tmp_path / "ppl.jsonl")) == 3  # resumed: nothing ran twice


def test_qa_through_the_reading_session(tmp_path, use_tiny):
    args = eval_args(tmp_path, "qa", "--lengths-x", "4", "--samples", "1", "--facts", "2",
                     "--policies", "sink", "full", "--new-tokens", "4")
    summary = evaluate.run_qa(args)
    rows = jsonl(tmp_path / "qa.jsonl")
    assert sorted((r["case"]["band"], r["case"]["policy"]) for r in rows) == [
        (b, p) for b in range(len(DEPTH_BANDS)) for p in ("full", "sink")]
    for r in rows:
        lo, hi = DEPTH_BANDS[r["case"]["band"]]
        assert lo <= r["depth"] <= hi and len(r["distractors"]) == 1
        assert (r["correct"], r["exact"]) == qa_score(r["answer"], r["word"], [r["word"], *r["distractors"]])
        assert 150 < r["doc_tokens"] <= 200  # 4 x 48 slots
        if r["case"]["policy"] == "full":
            assert r["fact_kept"] == 1.0
    sink = {r["case"]["band"]: r["fact_kept"] for r in rows if r["case"]["policy"] == "sink"}
    assert sink[0] == 0.0  # a 48-slot cache has long forgotten a fact in the first fifth of 190 tokens
    assert {c["policy"] for c in summary["cells"]} == {"sink", "full"}
    assert "| sink |" in (tmp_path / "qa.md").read_text()
    assert (tmp_path / "qa.png").read_bytes()[:4] == b"\x89PNG"
    evaluate.run_qa(args)
    assert len(jsonl(tmp_path / "qa.jsonl")) == len(rows)


def test_fact_positions_point_at_the_word(tokenizer, use_tiny):
    from engine import documents
    from engine.corpus import kjv_verses
    from engine.session import ReadingSession

    text, items = evaluate.qa_document(kjv_verses(), tokenizer, 400, [0.3, 0.7], random.Random(1))
    doc = documents.document_from_text(text, "t")
    session = ReadingSession(use_tiny, CacheConfig(policy="full"), stride=64, prompt="plain")
    session.read(doc)
    ids = tokenizer(session.format.prefix, add_special_tokens=False).input_ids + [
        i for piece in documents.tokenize_stream(doc, tokenizer) for i in piece]
    for it in items:
        pos = evaluate._fact_positions(session, doc, it)
        assert pos == list(range(pos[0], pos[-1] + 1))
        assert it["word"] in tokenizer.decode([ids[p] for p in pos])
        assert len(tokenizer.decode([ids[p] for p in pos])) <= len(it["word"]) + 3


def test_bad_settings_are_user_errors(tmp_path, use_tiny):
    from engine.errors import UserError

    with pytest.raises(UserError, match="too small"):
        evaluate.run_passkey(eval_args(tmp_path, "passkey", "--cascades", "100000"))
    with pytest.raises(UserError, match="lengths"):
        evaluate.run_passkey(eval_args(tmp_path, "passkey", "--lengths-x", "0"))
