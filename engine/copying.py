"""A summary in its own words: it may not copy a long run of tokens from the text it summarizes.

Asked for the beginning of a podcast transcript, SmolLM2-135M copied the transcript line by line,
timestamps and all ("[00:01:51] Maya: Welcome back to Harbor Notes. ..."): 46-61% of the words of the
podcast's cache-mode summaries sat in runs of 8+ words copied from it (docs/eval.md). An answer may
quote (a short answer is often the source's own words), so only summaries get this rule.

`CopyGuard` is a lookup built once from the source's token ids: for every run of n - 1 source tokens,
the tokens that follow it there. At each step the token that would complete a copied run of n is
ruled out, so the summary can reuse names and short phrases but never n source tokens in a row.
"""

from __future__ import annotations

import re

COPY_TOKENS = 12  # about 8 words: longer than a name with its title, shorter than a transcript line


class CopyGuard:
    def __init__(self, source_ids: list[int], n: int = COPY_TOKENS):
        if n < 2:
            raise ValueError(f"a copied run is at least 2 tokens, not {n}")
        self.n = n
        self.next: dict[tuple[int, ...], set[int]] = {}  # n - 1 source tokens -> the tokens after them there
        for i in range(len(source_ids) - n + 1):
            self.next.setdefault(tuple(source_ids[i: i + n - 1]), set()).add(source_ids[i + n - 1])

    def banned(self, ids: list[int]) -> set[int]:
        """Token ids that would make the last n tokens of `ids` + [id] a run copied from the source."""
        if len(ids) < self.n - 1:
            return set()
        return self.next.get(tuple(ids[len(ids) - self.n + 1:]), set())


ECHO_WORDS = 10  # a run this long shared with the request is the request said back, not a summary of the text


def without_echo(text: str, request: str, words: int = ECHO_WORDS) -> str:
    """`text` without its sentences that say its request back: a sentence goes when it shares a run of
    `words` words with `request` (any case). Asked "In one or two sentences, tell what happens in the middle
    of the document (about October, Jory and Orla).", SmolLM2 once wrote that sentence into the podcast's
    summary (docs/eval.md, stop 35)."""
    def runs(s: str) -> set[tuple[str, ...]]:
        w = re.findall(r"[a-z0-9']+", s.lower())
        return {tuple(w[i: i + words]) for i in range(len(w) - words + 1)}

    asked = runs(request)
    pieces = re.split(r"(?<=[.!?])(\s+)", text)  # sentence, space, sentence, ...: kept as written
    kept = [(pieces[i], pieces[i + 1] if i + 1 < len(pieces) else "") for i in range(0, len(pieces), 2)
            if not runs(pieces[i]) & asked]
    return "".join(sentence + space for sentence, space in kept).strip()


def whole_sentences(text: str) -> str:
    """A summary cut by its token limit, without its unfinished last sentence (if it has a finished one)."""
    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]?(?=\s|$)", text)]
    return text[:ends[-1]] if ends else text
