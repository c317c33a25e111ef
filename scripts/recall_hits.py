"""Recall hit rate of the book and Bible question sets without the model (about 10 s for the Bible).

    python scripts/recall_hits.py [--narrow N] [--budget TOKENS] [--share S]

Runs `engine.recall.rank` exactly as a question would (BM25 order; the attention signal needs the
model and only breaks ties far below the budget, see recall.FUSION) over the same passages and index
the evaluation builds, and counts how often what would be re-read overlaps the verse holding the
answer. Bible questions bib-11 and later are reported apart: they are the held-out check, never used
to choose a setting.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import documents, eval_books, models, recall  # noqa: E402
from engine.session import ReadingSession  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--narrow", type=int, default=recall.NARROW_TOKENS, help="--recall-narrow (0 = whole passages)")
    ap.add_argument("--budget", type=int, default=384, help="--recall-tokens")
    ap.add_argument("--share", type=float, default=recall.MIN_SHARE, help="--recall-share")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.ensure_packaged(models.PACKAGED[models.DEFAULT_MODEL], say=lambda s: None)))
    data = eval_books.load_set()
    sets = [("books", {b: eval_books.book_text(b) for b in data["books"]}, data["questions"]),
            ("Bible", {"Bible": eval_books.book_text(None, bible=True)}, data["bible"])]
    for name, books, items in sets:
        rows = []
        for book, (text, verses) in books.items():
            doc = documents.document_from_text(text, book)
            source = documents.SourceMap(doc)
            for _ in documents.tokenize_stream(doc, tokenizer, source_map=source):
                pass
            index = recall.PassageIndex.build(doc, source.offsets)
            for it in items:
                if name == "books" and it["book"] != book:
                    continue
                picked = recall.rank(index, it["question"], None, args.budget, tokens_of=ReadingSession.recall_cost,
                                     offsets=source.offsets, narrow_tokens=args.narrow, min_share=args.share)
                hit = eval_books.hits(eval_books.char_ranges(r.passage for r in picked), eval_books.gold_spans(it, verses))
                rows.append((it["id"], hit, len(picked)))
        held = [h for i, h, _ in rows if i.startswith("bib-") and int(i[4:]) > 10]
        tuned = [h for i, h, _ in rows if not (i.startswith("bib-") and int(i[4:]) > 10)]
        print(f"{name}: hit {sum(tuned)}/{len(tuned)}" + (f", held-out {sum(held)}/{len(held)}" if held else "")
              + f"; {sum(n for *_, n in rows) / len(rows):.1f} passages a question; missed {[i for i, h, _ in rows if not h]}")


if __name__ == "__main__":
    main()
