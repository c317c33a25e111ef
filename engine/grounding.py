"""Grounded names: a summary may name only the people, places and numbers its source names.

A 135M model fills the gaps of what it read with what it knows: "Mount Sinai" and "the Red Sea" in
a summary of Exodus 1-12, "the Messiah, Jesus Christ" in one of Genesis, verse numbers from other
chapters (docs/eval.md, issue 14). Asking it to "use only the names it gives" did not help. So the
decoder enforces it: `SourceNames` is a logits processor that, at each step, walks the most likely
next tokens and rules out those that would start, continue or end a capitalised word or a number
the source never writes (case-insensitive, so the KJV's "LORD" grounds "Lord"; "Israelites" is
grounded by "Israel"). Words in lower case are never touched: the model keeps its own wording.

The rule, for the word being written (letters and digits since the last other character):
- a capitalised word or a number must stay a prefix of a source word (or of a source word plus a
  demonym ending) while it grows, and be a whole one when it ends;
- at the start of a sentence a capitalised common word ("The", "After", "Then") is allowed too
  (`eval_summary.COMMON`, the list the grounding metric uses). Only there: in mid-sentence, "Mo"
  (a start of "Moreover") let the model on to "Moab" in a chapter that never names it.
- a word in mixed case ("NiNeVEh", "MidSt": a capital after a small letter, and not all capitals)
  must be written so in the source: matching case-insensitively, the 135M model spelled out
  "A-MidSt-A-I-NiNeVEh" from the source's "midst" and "Nineveh" in a summary of Jonah.
If every likely token is ruled out, more are examined (`WIDER`) before the model keeps its choice.
"""

from __future__ import annotations

import re

import torch

from .eval_summary import COMMON, DEMONYM, NUMBER, proper_names
from .prompts import NAMES_HINT, NAMES_LEAD

# Letters and digits of any script: with ASCII-only words, "Shall" + "ām" wrote "Shallām" (a name
# no source has) as the grounded word "Shall" followed by a new lower-case word.
_WORD = re.compile(r"[^\W_]+")
# A number is checked whole with its groups ("00:01:54", "3:16", "1,000"), as the grounding metric
# counts it (eval_summary.NUMBER): digit by digit group, a transcript's summary wrote timestamps its
# source never has, each group of which it has.
_TOKEN = re.compile(rf"{NUMBER.pattern}|[^\W_]+")
_TAIL = re.compile(r"(?:\d+[.,:])*[^\W_]*$")  # the word or number being written (a number may end in a separator)
CANDIDATES = 40  # next tokens examined per step, most likely first; beyond them the model's choice is rare
WIDER = 1000  # examined when all of the first CANDIDATES are ruled out


def _mixed(word: str) -> bool:
    """A capital after a small letter, in a word that is not all capitals ("MidSt"; not "LORD", "Moses")."""
    return not word.isupper() and any(a.islower() and b.isupper() for a, b in zip(word, word[1:]))


class SourceNames:
    """logits_processor(generated ids, logits [vocab]) -> logits, with ungrounded names ruled out."""

    def __init__(self, source: str, tokenizer, candidates: int = CANDIDATES):
        self.tokenizer, self.candidates = tokenizer, candidates
        found = _WORD.findall(source)
        self.words = {w.lower() for w in found} | set(NUMBER.findall(source))
        # names the source writes with a capital, the only ones a demonym ending may follow ("Israelites")
        self.names = {w.lower() for w in found if w[0].isupper() and len(w) >= 3} - COMMON
        self.prefixes = {w[:i] for w in self.words for i in range(1, len(w) + 1)}
        self.common_prefixes = {w[:i] for w in COMMON for i in range(1, len(w) + 1)}
        self.endings = {s[:i] for s in DEMONYM for i in range(1, len(s) + 1)}
        self.mixed = {w[:i] for w in found if _mixed(w) for i in range(1, len(w) + 1)}  # as written
        self._pieces: dict[int, str] = {}

    def allow(self, text: str) -> "SourceNames":
        """Also allow the words of `text` (a prompt format's own turn words: a base model ends its
        answer by writing "Question:", which no source needs to contain). Returns self."""
        for w in _WORD.findall(text) + NUMBER.findall(text):
            w = w.lower()
            self.words.add(w)
            self.prefixes.update(w[:i] for i in range(1, len(w) + 1))
        return self

    # ---- the rule, on strings
    def _grown(self, word: str, opens_sentence: bool) -> bool:
        """Whether `word` (lower case) may still become a grounded word."""
        if word in self.prefixes or (opens_sentence and word in self.common_prefixes):
            return True
        return any(word[:i] in self.names and word[i:] in self.endings for i in range(3, len(word)))

    def _whole(self, word: str, opens_sentence: bool) -> bool:
        if word in self.words or (opens_sentence and word in COMMON):
            return True
        return any(word[:i] in self.names and word[i:] in DEMONYM for i in range(3, len(word)))

    @staticmethod
    def _checked(word: str) -> bool:
        """Names and numbers are checked; words that start in lower case are the model's own."""
        return bool(word) and (word[0].isupper() or word[0].isdigit())

    def allowed(self, text: str, piece: str) -> bool:
        """Whether `piece` may follow `text` (what the model wrote so far)."""
        return self._allowed(*self._split(text), piece)

    @staticmethod
    def _split(text: str) -> tuple[str, str]:
        """(what comes before the word being written, that word so far)"""
        tail = _TAIL.search(text).group()
        return text[:len(text) - len(tail)], tail

    def _allowed(self, before: str, tail: str, piece: str) -> bool:
        joined = tail + piece
        for m in _TOKEN.finditer(joined):
            w, b = m.group(), m.end()
            if not self._checked(w):
                continue
            finished = b < len(joined)  # something other than a letter or digit follows it in this piece
            if b <= len(tail) and not finished:
                continue  # the unchanged tail, still open: it was checked when written
            opens = (before + joined[:m.start()]).rstrip()[-1:] in ("", ".", "!", "?", ":", '"', "\n")
            low = w.lower()
            if finished and b + 1 == len(joined) and joined[b] in ".,:" and w[0].isdigit():
                # "00:01:" may go on to "00:01:41", and "in 1871." may end a sentence; "1:" that is
                # neither led to a dead end where every next token was ruled out (then the model's
                # own choice is kept, and it wrote "1:2:3:4:1:1:5" in a transcript's summary)
                if self._grown(low + joined[b], opens) or self._whole(low, opens):
                    continue
                return False
            if _mixed(w) and w not in self.mixed:
                return False
            if not (self._whole(low, opens) if finished else self._grown(low, opens)):
                return False
        return True

    # ---- the processor
    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token])
        return self._pieces[token]

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        text = self.tokenizer.decode(generated, skip_special_tokens=True) if generated else ""
        before, tail = self._split(text)  # once per step, not once per candidate
        for k in (self.candidates, WIDER):
            top = torch.topk(logits.float(), min(k, logits.shape[-1])).indices.tolist()
            banned = [t for t in top if not self._allowed(before, tail, self._piece(t))]
            if len(banned) < len(top):
                break
        else:
            return logits  # nothing grounded among the likely tokens: leave the model's choice
        if banned:
            logits = logits.clone()
            logits[banned] = float("-inf")
        return logits


# ---- main names: what a summary request asks to be mentioned
MAIN_NAMES = 4  # names given to each summary request (0: none)


def main_names(source: str, document_text: str, k: int = MAIN_NAMES) -> list[str]:
    """The k names `source` uses most, in the order it first uses them. A name is a capitalised word the
    whole document rarely writes in lower case (`eval_summary.proper_names`, the rule the coverage metric
    counts with, so the request and the measurement agree on what a name is)."""
    return _in_first_use_order([w for w, _ in proper_names(source, document_text).most_common(k)] if k else [], source)


def part_names(source: str, part_text: str, document_text: str, k: int = MAIN_NAMES) -> list[str]:
    """The k names of `source` (passages of one part of the document) that are most that part's own, in
    the order `source` first uses them: ranked by count in `source` times the share of the document's
    uses that fall in `part_text`. A hero named all through a book ranks below the people the part
    brings in, so a summary's middle names the middle's people (docs/eval.md, issue 14)."""
    counts, part, whole = (proper_names(t, document_text) for t in (source, part_text, document_text))
    ranked = sorted(counts, key=lambda w: counts[w] * part[w] / max(whole[w], 1), reverse=True)[:k] if k else []
    return _in_first_use_order(ranked, source)


def _in_first_use_order(names: list[str], source: str) -> list[str]:
    first = {w: m.start() if (m := re.search(rf"\b{re.escape(w)}", source)) else len(source) for w in names}
    return sorted(names, key=first.get)


def with_names(question: str, lead: str, label: str, names: list[str]) -> tuple[str, str]:
    """A summary request about `label` and a base model's lead, naming `names` when there are any:
    "Summarize Chapter 2 (about Naomi, Ruth and Boaz) in ..." / "Chapter 2 names Naomi, Ruth and Boaz. In ..."."""
    if not names:
        return question, lead
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return (question.replace(label, NAMES_HINT.format(label=label, names=listed), 1),
            NAMES_LEAD.format(label=label, names=listed) + lead)
