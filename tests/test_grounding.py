"""Grounded names (engine/grounding.py): a summary writes only names and numbers its source has."""

import torch

from engine.eval_summary import entities, grounded
from engine.grounding import SourceNames

SOURCE = "And Moses went unto Pharaoh king of Egypt, in the year 430. The LORD spake."


def test_names_and_numbers_must_be_the_sources_while_they_grow_and_when_they_end(smollm2):
    g = SourceNames(SOURCE, smollm2.tokenizer)
    assert g.allowed("", "Moses") and g.allowed("", "Mos") and g.allowed("Mos", "es,")
    assert not g.allowed("Mos", " went")  # "Mos" ended unfinished
    assert not g.allowed("They went to", " Rome") and not g.allowed("The ", "Rom")  # never in the source
    assert g.allowed("The", " Lord") and g.allowed("the", " Israelites") is False  # "Israel" is not in SOURCE
    assert g.allowed("the", " Egyptians") and g.allowed("the", " Egyptian")  # a demonym of a source name
    assert not g.allowed("the land of", " Theian")  # but not of a common word
    assert g.allowed("in year", " 43") and g.allowed("in year 43", "0.") and not g.allowed("in year 4", "31")
    assert g.allowed("", "Then") and g.allowed("It rained. ", "After")  # a sentence may open with a common word
    assert not g.allowed("the land of the", " Al")  # "Al(so)" opens a sentence; in mid-sentence only source words
    assert g.allowed("the land of", " Egypt")
    assert g.allowed("", " rome") and g.allowed("a", " messiah")  # lower-case words are the model's own


def test_a_number_with_groups_must_be_the_sources_whole(smollm2):
    g = SourceNames("[00:01:41] Maya: Welcome. Genesis 3:16 says so, in 1903.", smollm2.tokenizer)
    assert g.allowed("at 00:01:", "41") and g.allowed("at 00:01", ":") and g.allowed("at", " 00:01:41]")
    assert not g.allowed("at 00:01:", "54") and not g.allowed("at 00:", "02")  # each group is the source's
    assert g.allowed("verse 3:", "16") and not g.allowed("verse 3:", "17")
    assert g.allowed("It was 1903", ".") and g.allowed("It was 1903.", " Then") and not g.allowed("It was 19", "04")
    assert g.allowed("at 00:01:41", ":") and g.allowed("at 00:01:41:", " Maya")  # an open separator, then a word
    # "1:" starts no number of the source, and "1" is none: every next token would be ruled out there
    assert g.allowed("at 1", "9") and not g.allowed("at 1", ":") and g.allowed("at 3", ":")


def test_the_processor_turns_the_greedy_choice_to_a_grounded_name(smollm2):
    tok = smollm2.tokenizer
    g = SourceNames(SOURCE, tok)
    rome, moses = tok.encode(" Rome", add_special_tokens=False), tok.encode(" Moses", add_special_tokens=False)
    assert len(rome) == 1 and len(moses) == 1
    logits = torch.zeros(len(tok))
    logits[rome[0]], logits[moses[0]] = 5.0, 4.0
    prefix = tok.encode("He went to", add_special_tokens=False)
    out = g(prefix, logits)
    assert int(out.argmax()) == moses[0] and out[rome[0]] == float("-inf")
    assert torch.equal(g(prefix, torch.where(torch.arange(len(tok)) == moses[0], 9.0, 0.0)),
                       torch.where(torch.arange(len(tok)) == moses[0], 9.0, 0.0))  # a grounded choice stays


def test_summaries_name_only_what_their_section_names(smollm2):
    from engine import documents
    from engine.cache import CacheConfig
    from engine.session import ReadingSession
    from engine.summaries import summarize_sections

    text = "\n\n".join(f"Chapter {k + 1}\n" + body for k, body in enumerate((
        "Naomi and her husband Elimelech went from Bethlehem to the country of Moab with their two sons. "
        "Elimelech died, and the sons took wives of Moab, Orpah and Ruth. After ten years the sons died too. " * 12,
        "Ruth gleaned in the field of Boaz, a kinsman of Elimelech, and Boaz was kind to her, for he had heard "
        "how she left her own land to stay with Naomi. She gleaned until the end of the barley harvest. " * 12)))
    doc = documents.document_from_text(text, title="Ruth retold")
    session = ReadingSession(smollm2, CacheConfig(sinks=64, window=256, cascades=2), stride=256)
    events = list(summarize_sections(session, doc, max_new_tokens=48, final_tokens=48))
    sections = [e for e in events if e["type"] == "section"]
    assert len(sections) == 2
    for s in sections:
        source = doc.title + "\n" + s["label"] + "\n" + doc.text[s["start_char"]:s["end_char"]]
        names = entities(s["summary"])
        assert all(grounded(n, source) for n in names), (s["summary"], names)
    final = events[-1]["summary"]
    assert final.strip() and all(grounded(n, doc.title + "\n" + doc.text) for n in entities(final)), final


def test_a_base_models_turn_word_stays_writable(smollm2):
    """A base model ends its answer by starting the next turn ("Question:"); grounded names must not
    forbid that word, or the answer runs on into copied passages up to the token limit."""
    g = SourceNames(SOURCE, smollm2.tokenizer)
    assert not g.allowed("Puah.\n", "Question")
    assert g.allow("Question: \nAnswer:") is g
    assert g.allowed("Puah.\n", "Question") and g.allowed("Puah.\nQuest", "ion:")
    assert not g.allowed("He went to", " Rome")  # everything else is as grounded as before


def test_letters_of_any_script_are_part_of_the_word(smollm2):
    """ "Shall" is a source word, but "Shallām" is a name no source has: the non-ASCII letter must not
    end the word (the 135M model wrote "the kingdom of Shallām" in a summary of Esther)."""
    g = SourceNames("Moses shall go unto Pharaoh.", smollm2.tokenizer)
    assert g.allowed("the kingdom of", " Shall")
    assert not g.allowed("the kingdom of Shall", "ām") and not g.allowed("the kingdom of", " Shallām")
    assert entities("He came from Shallām and Moses.") == ["Shallām", "Moses"]
    assert not grounded("Shallām", "Moses shall go unto Pharaoh.")


def test_a_word_in_mixed_case_must_be_written_so_in_the_source(smollm2):
    """Matched without case, "midst" and "Nineveh" let the 135M model write "A-MidSt-A-I-NiNeVEh"."""
    g = SourceNames("Jonah went in the midst of Nineveh with McAdam. The LORD spake.", smollm2.tokenizer)
    assert g.allowed("the son of", " Mid") and not g.allowed("the son of Mid", "St")
    assert not g.allowed("the city of Ni", "NeVEh") and g.allowed("the city of", " Nineveh")
    assert g.allowed("with", " McAdam") and g.allowed("with Mc", "Ad")  # mixed case the source writes
    assert g.allowed("the", " LORD") and g.allowed("the", " Lord")  # all capitals, or a capital first
