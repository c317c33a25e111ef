"""Summaries without a model: chapters and sections, central passages, and the summary metrics."""

import numpy as np
import pytest

from engine import documents, recall
from engine.copying import ECHO_WORDS, whole_sentences, without_echo
from engine.eval_summary import (coverage, entities, grounding, load_doc, order_correlation, proper_names,
                                 repetition, score_row, third_names, thirds)
from engine.grounding import main_names, part_names, with_names
from engine.summaries import Eta, section_bounds


def test_the_summary_set_takes_a_run_of_chapters_from_any_book():
    acts = load_doc("Acts 27-28").text
    assert acts.startswith("Chapter 27\n1 And when it was determined") and "\nChapter 28\n" in acts
    samuel = load_doc("1 Samuel 17-20").text  # a book name with a space
    assert samuel.startswith("Chapter 17\n") and "\nChapter 20\n" in samuel and "\nChapter 21\n" not in samuel
    assert load_doc("Exodus 1-12").text.startswith("Chapter 1\n")
    with pytest.raises(ValueError, match="no chapter 99"):
        load_doc("Jonah 99-100")


def test_chapters_are_found_in_plain_text_in_every_heading_style():
    text = ("A preface that is not a chapter.\n\nCHAPTER I\nThe sea was grey.\n\nChapter 2: The Storm\n"
            "The wind rose.\n\n## Part Three\nThe harbour.\n\nChapter twelve is a phrase in a sentence, not a heading "
            "because this line goes on far too long to be one.\n")
    doc = documents.document_from_text(text, "novel")
    found = documents.chapters(doc)
    assert [c[2] for c in found] == ["opening", "CHAPTER I", "Chapter 2: The Storm", "Part Three"]
    assert [doc.text[a:b].split("\n")[0] for a, b, _ in found[1:]] == ["CHAPTER I", "Chapter 2: The Storm",
                                                                       "## Part Three"]
    assert found[0][0] == 0 and found[-1][1] == len(doc.text.rstrip())  # the chapters cover the text
    assert all(b <= c for (_, b, _), (c, _, _) in zip(found, found[1:]))
    assert documents.chapters(documents.document_from_text("Chapter 1\nonly one heading\n", "x")) is None


def test_sections_follow_chapters_and_stay_few():
    esther = load_doc("Esther")
    bounds = section_bounds(esther)
    assert bounds[0][2] == "Chapter 1" and bounds[-1][2].endswith("Chapter 10")
    assert all(esther.text[a:b].startswith("Chapter") for a, b, _ in bounds)  # sections start at a chapter
    assert all(b <= c for (_, b, _), (c, _, _) in zip(bounds, bounds[1:])) and bounds[-1][1] >= len(esther.text) - 1
    exodus = load_doc("Exodus 1-12")
    assert 3 <= len(section_bounds(exodus, max_sections=4)) <= 4  # chapters grouped, never more than asked
    # plain text without headings: cut at paragraph breaks into about equal parts, labelled by lines
    plain = documents.document_from_text("\n\n".join(f"Paragraph {i} " + "word " * 80 for i in range(60)), "plain")
    parts = section_bounds(plain, max_sections=6)
    sizes = [b - a for a, b, _ in parts]
    assert len(parts) == 6 and max(sizes) < 1.5 * min(sizes) and parts[0][2] == "lines 1-19"
    assert all(plain.text[a:b].startswith("Paragraph") for a, b, _ in parts)


def test_subtitles_are_sectioned_by_time():
    podcast = load_doc("podcast")
    bounds = section_bounds(podcast, min_chars=1000)
    assert len(bounds) >= 2 and bounds[0][2].startswith("00:00:03-") and bounds[-1][2].endswith("00:04:32")


def test_eta_needs_one_timed_section_then_counts_what_is_left():
    eta = Eta(total_tokens=1000, sections=4, section_tokens=100, final_tokens=200)
    assert eta.seconds_left() is None
    eta.read_tokens, eta.read_seconds, eta.summary_seconds, eta.done = 250, 1.0, 5.0, 1
    assert eta.seconds_left() == 750 / 250 + 5.0 * (3 + 2)


def test_central_passages_spread_over_the_whole_book():
    doc = load_doc("Esther")
    offsets = np.arange(0, len(doc.text), 4, dtype=np.int64)  # one 'token' per 4 characters
    index = recall.PassageIndex.build(doc, offsets)
    picked = recall.central(index, doc.text, budget=1152)
    assert 4 <= len(picked) and sum(r.passage.tokens + 8 for r in picked) <= 1152
    where = [r.passage.token_start / len(offsets) for r in picked]
    assert where == sorted(where) and where[0] < 1 / 3 and any(1 / 3 <= w < 2 / 3 for w in where) and where[-1] >= 2 / 3


# ------------------------------------------------------------------ metrics

RUTH = load_doc("Ruth").text


def test_grounding_counts_names_and_numbers_missing_from_the_source():
    s = "Naomi went to Moab with Elimelech. Then Jesus Christ came, in 1871. However, Boaz married Ruth."
    assert entities(s) == ["Naomi", "Moab", "Elimelech", "Jesus", "Christ", "Boaz", "Ruth", "1871"]
    assert grounding(s, RUTH) == (5, 8)
    chapter1 = RUTH[:RUTH.index("Chapter 2")]
    assert grounding("Boaz met Ruth.", chapter1) == (1, 2)  # Boaz is in the book, not in chapter 1
    # a name formed from one in the source, and the document's title, are grounded
    assert grounding("The Moabites of Moab and the Israelites; the book of Ruth.", "Moab and Israel") == (3, 4)
    assert grounding("The book of Ruth.", "Moab", title="Ruth") == (1, 1)


def test_proper_names_skip_words_capitalised_only_where_a_verse_starts():
    names = proper_names(RUTH)
    assert [w for w, _ in names.most_common(5)] == ["Naomi", "Boaz", "LORD", "Ruth", "Moab"]
    assert "Behold" not in names and "Wherefore" not in names and "And" not in names
    assert coverage("Ruth stayed with naomi.", ["Naomi", "Boaz", "Ruth"]) == (2, 3)


def test_repetition_finds_loops_and_passes_varied_text():
    loop = "Sarah was killed by God. Then Sarah was killed by God. Sarah was killed by God again."
    r = repetition(loop)
    assert r["loop"] and r["repeated_sentences"] == 2 and r["ngram4_repeat_rate"] > 0.25
    ok = repetition("Naomi loses her husband in Moab. Ruth follows her to Bethlehem. Boaz marries Ruth.")
    assert not ok["loop"] and ok["ngram4_repeat_rate"] == 0.0


def test_order_correlation_and_thirds():
    names = list(proper_names(RUTH))
    in_order = "Elimelech dies in Moab; Naomi returns to Bethlehem with Ruth, who marries Boaz; Obed is born."
    backwards = "Obed is born to Boaz, who met Ruth in Bethlehem after Naomi left Moab when Elimelech died."
    assert order_correlation(in_order, RUTH, names) > 0.8 > 0 > order_correlation(backwards, RUTH, names)
    assert order_correlation("Naomi.", RUTH, names) is None  # fewer than 3 names
    first, _, last = third_names(RUTH)
    assert "Elimelech" in first and "Obed" in last
    assert thirds("Elimelech died.", RUTH)[0] and not thirds("Elimelech died.", RUTH)[2]


def test_score_row_attributes_section_summaries_to_their_sections():
    a = RUTH.index("Chapter 2")
    row = {"summary": "Naomi and Ruth came to Bethlehem.", "cut": False,
           "sections": [{"label": "Chapter 1", "start_char": 0, "end_char": a, "summary": "Naomi left Moab with Ruth.",
                         "cut": False},
                        {"label": "Chapter 2-4", "start_char": a, "end_char": len(RUTH),
                         "summary": "Boaz met Ruth and Pharaoh.", "cut": True}]}
    m = score_row(row, RUTH)
    assert [s["grounded_section"] for s in m["sections"]] == [(3, 3), (2, 3)]
    assert m["sections"][0]["coverage"] == (2, 3) and m["sections"][1]["cut"]  # chapter 1's top 3: Naomi, LORD, Moab
    assert m["final_grounded"] == (3, 3) and m["final_coverage"][1] == 10
    # the reference: the section summaries read one after another, in the book's order
    names = list(proper_names(RUTH))
    assert m["section_order"] == order_correlation("Naomi left Moab with Ruth. Boaz met Ruth and Pharaoh.",
                                                   RUTH, names) > 0.5
    row["sections"][0]["summary"], row["sections"][1]["summary"] = "Obed was born.", "Naomi left Moab."
    assert score_row(row, RUTH)["section_order"] < 0  # Obed is the book's last name


def test_copied_counts_the_words_inside_long_runs_of_the_document():
    from engine.eval_summary import COPIED_WORDS, copied

    line = "And she said unto her, All that thou sayest unto me I will do."  # Ruth 3:5, 14 words
    assert line in RUTH and COPIED_WORDS == 8
    assert copied(f"Ruth answered {line.lower()} Then Boaz slept.", RUTH) == (14, 19)  # any case, any commas
    assert copied("Ruth went to Boaz and asked him for his help at night.", RUTH) == (0, 12)
    assert copied("", RUTH) == (0, 0)


def test_a_cut_summary_loses_its_unfinished_sentence():
    assert whole_sentences('Naomi went home. Ruth said "no." Boaz then') == 'Naomi went home. Ruth said "no."'
    assert whole_sentences("no sentence ends here") == "no sentence ends here"


def test_central_passages_of_one_part_stay_in_it_and_rank_by_its_own_words():
    doc = load_doc("Esther")
    offsets = np.arange(0, len(doc.text), 4, dtype=np.int64)
    index = recall.PassageIndex.build(doc, offsets)
    end = index.passages[-1].token_end
    last = recall.central(index, doc.text, budget=1152, span=(2 * end // 3, end))
    assert last and all(2 * end // 3 <= r.passage.token_start < end for r in last)
    assert sum(r.passage.tokens + 8 for r in last) <= 1152
    assert recall.central(index, doc.text, budget=1152, span=(end, 2 * end)) == []  # no passage there


def test_main_names_are_the_most_used_in_the_order_of_first_use():
    doc = ("And Naomi went with Ruth. Then Boaz said unto Ruth, Come. Ruth came to Boaz, and Boaz spake. "
           "And Naomi said, Blessed be Boaz. Behold, Orpah went home.")
    assert main_names(doc, doc, 3) == ["Naomi", "Ruth", "Boaz"]  # by count: Boaz 4, Ruth 3, Naomi 2
    assert main_names(doc, doc, 0) == [] and "Behold" not in main_names(doc, doc, 10)
    q, lead = with_names("Summarize Chapter 2 in two sentences.", "Chapter 2 tells how", "Chapter 2", ["Naomi", "Ruth"])
    assert q == "Summarize Chapter 2 (about Naomi and Ruth) in two sentences."
    assert lead == "Chapter 2 names Naomi and Ruth. Chapter 2 tells how"
    assert with_names("Summarize Chapter 2.", "lead", "Chapter 2", []) == ("Summarize Chapter 2.", "lead")


def test_part_names_prefer_the_people_a_part_brings_in_over_the_hero_named_all_through():
    first = "Ruth went with Naomi. Ruth said, Naomi, I go. And Ruth wept. "
    middle = "Ruth met Boaz. Then Ruth spake, and Boaz said, Ruth, come. Ruth came; Boaz gave Ruth corn. "
    end = "And Ruth bare Obed, and Ruth was blessed. Ruth was glad. "
    doc = first + middle + end
    assert main_names(middle, doc, 1) == ["Ruth"]  # the most used name in the middle
    assert part_names(middle, middle, doc, 1) == ["Boaz"]  # the middle's own: 3 of Boaz's 3 uses against 4 of Ruth's 10
    assert part_names(middle, middle, doc, 2) == ["Ruth", "Boaz"]  # in the order the passages first use them
    assert part_names(middle, middle, doc, 0) == []


def test_summary_eval_writes_rows_and_a_report_and_resumes(use_tiny, tmp_path):
    """`engine eval summary` end to end on the tiny random model with the real tokenizer: a row, the
    report with its copied column, and a rerun that adds nothing (sections mode: test_session.py)."""
    import argparse
    import json

    from engine import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["summary", "--docs", "Jonah", "--modes", "cache", "--window", "64", "--sinks", "16", "--stride", "256",
                              "--new-tokens", "12", "--copy-tokens", "6", "--variant", "t", "--out", str(tmp_path)])
    evaluate.main(args)
    rows = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert [r["case"]["mode"] for r in rows] == ["cache"]
    assert all(r["summary"].strip() for r in rows) and rows[0]["case"]["variant"] == "t"
    report = (tmp_path / "summary.md").read_text()
    assert "copied (all; final)" in report and "| t | " in report
    evaluate.main(args)
    assert len((tmp_path / "summary.jsonl").read_text().splitlines()) == len(rows)


def test_a_summary_part_loses_the_sentences_that_say_its_request_back():
    request = "In one or two sentences, tell what happens in the middle of the document (about Jory and Orla)."
    text = ("Maya: Jory was nineteen.\nThe storm broke the glass.  In one or two sentences, tell what happens in "
            "the middle of the document (about Jory and Orla). The board sold the tower.")
    assert without_echo(text, request) == "Maya: Jory was nineteen.\nThe storm broke the glass.  The board sold the tower."
    shared = "What happens in the middle of the document is a storm."  # 8 words shared: a summary may say that
    assert ECHO_WORDS > 8 and without_echo(shared, request) == shared
    assert without_echo("Line one.\n\nLine two!", request) == "Line one.\n\nLine two!"  # nothing echoed: as written

