"""Prompt formats: where the document goes, where questions go, for chat and plain (base) models.

The chat format is rendered from the model's own chat template with placeholder markers, then
split, so the document can be streamed between a fixed prefix and a question suffix.
"""

from __future__ import annotations

from dataclasses import dataclass

DOC_INTRO = "Read the following document. Afterwards, answer questions about it.\n\n<document>\n"
DOC_OUTRO = "\n</document>\n\n"
SUMMARY_QUESTION = "Summarize the document above in a few sentences, covering its main points."
# A cache-mode summary is written in parts (session.SUMMARY_PARTS), each after its own third's passages
SUMMARY_PART_QUESTION = "Summarize the {part} of the document in one or two sentences: who does what."
# ... of a book or other prose: asked to *tell what happens*, SmolLM2 names each third's own people (thirds 10 ->
# 13 of 14, order 0.56 -> 0.75 on the summary set, docs/eval.md stop 35); a transcript asked so copies its lines
SUMMARY_PART_STORY_QUESTION = "In one or two sentences, tell what happens in the {part} of the document: who does what."
# {label}: the section's label ("Chapter 3", "p. 4-6"); asks for what the text says, not what the model knows
SECTION_QUESTION = "Summarize {label} in two or three sentences: who does what. Use only the names it gives."
# a base model (plain format) continues text rather than following requests: it gets the start of the summary
SECTION_LEAD = "In two or three sentences, using only its own names and events, {label} tells how"
# The text's main names (grounding.main_names), in the order it first uses them, added to a summary request:
# an entity plan, as in Narayan et al. 2021 ("Planning with learned entity prompts"), but counted from the
# text instead of predicted. Measured in docs/eval.md (issue 14).
NAMES_HINT = "{label} (about {names})"
NAMES_LEAD = "{label} names {names}. "


# Recalled passages are read after the document, before the question. A chat model is told what they
# are and to answer from them. A base model gets no such words: on the first 17 Exodus questions of
# the book set, Gemma-3-270M (plain) answered 4 with them and 8 without (its oracle: 9).
RECALL_INTRO = "Passages of the document that may answer the question:\n\n"
RECALL_ASK = "Answer from the document. "


@dataclass(frozen=True)
class PromptFormat:
    name: str  # "chat" or "plain"
    prefix: str  # before the document (pinned in the sinks)
    question: str  # after the document; {q} is the question
    follow_up: str  # after a previous answer, for a running conversation; {q} is the question
    bare: str  # a question with no document at all (the "no document" reference); {q} is the question
    recall_intro: str = RECALL_INTRO  # before recalled passages
    recall_ask: str = RECALL_ASK  # before a question answered from recalled passages

    def question_text(self, q: str) -> str:
        return DOC_OUTRO + self.question.format(q=q)

    def request_text(self, q: str, lead: str) -> str:
        """After the document: a request `q` for a chat model, the opening words `lead` for a base model."""
        return DOC_OUTRO + lead if self.name == "plain" else self.question_text(q)

    def follow_up_text(self, q: str) -> str:
        return self.follow_up.format(q=q)

    def bare_text(self, q: str) -> str:
        return self.bare.format(q=q)


def _split(text: str, marker: str) -> tuple[str, str]:
    before, sep, after = text.partition(marker)
    if not sep:
        raise ValueError(f"chat template lost the marker {marker!r}")
    return before, after


def prompt_format(tokenizer, name: str, bos: str = "") -> PromptFormat:
    """bos: text that must start a plain prompt (LoadedModel.bos); chat templates bring their own."""
    if name == "plain":
        return PromptFormat("plain", bos + DOC_INTRO, "Question: {q}\nAnswer:", "\n\nQuestion: {q}\nAnswer:",
                            bos + "Question: {q}\nAnswer:", recall_intro="", recall_ask="")
    if name != "chat":
        raise ValueError(f"prompt format must be 'chat' or 'plain', not {name!r}")
    # Render a two-turn conversation with markers, then cut it into reusable pieces.
    d, q1, a1, q2 = "\x00DOC\x00", "\x00Q1\x00", "\x00A1\x00", "\x00Q2\x00"
    msgs = [{"role": "user", "content": DOC_INTRO + d + q1}, {"role": "assistant", "content": a1},
            {"role": "user", "content": q2}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prefix, rest = _split(text, d)
    _, rest = _split(rest, q1)
    after_q1, rest = _split(rest, a1)
    between, after_q2 = _split(rest, q2)
    alone = tokenizer.apply_chat_template([{"role": "user", "content": q1}], tokenize=False, add_generation_prompt=True)
    before, after = _split(alone, q1)
    return PromptFormat("chat", prefix, "{q}" + after_q1, between + "{q}" + after_q2,
                        before.replace("{", "{{").replace("}", "}}") + "{q}" + after.replace("{", "{{").replace("}", "}}"))
