"""The real default model (SmolLM2-135M-Instruct): exactness, a fact near the end, the CLI contract."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import reference_logits
from engine.cache import CacheConfig
from engine.corpus import kjv_text
from engine.runtime import Engine

pytestmark = pytest.mark.real_model

FACT = "Note: the secret password of the library is BLUEBERRY.\n"


def text_with_fact(chars: int, back: int) -> str:
    """KJV text with FACT inserted about `back` characters before the end (at a line start)."""
    base = kjv_text(max_chars=chars)
    cut = base.rfind("\n", 0, len(base) - back) + 1
    return base[:cut] + FACT + base[cut:]


@pytest.mark.parametrize("policy", ["cascade", "sink"])
def test_logits_equal_plain_transformers_when_text_fits(smollm2, policy):
    ids = smollm2.tokenizer(kjv_text(max_chars=1500), add_special_tokens=False).input_ids
    assert 300 < len(ids) < 512
    engine = Engine(smollm2, CacheConfig(policy=policy, sinks=64, window=512, cascades=4), stride=128)
    cache = engine.new_cache()
    got = torch.cat([engine.forward(torch.tensor([ids[i:i + 128]]), cache, logits="all")
                     for i in range(0, len(ids), 128)], dim=1)
    want = reference_logits(smollm2, ids)
    assert (got - want).abs().max() < 2e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_answers_a_fact_near_the_end_through_a_512_slot_cascade(smollm2):
    from engine import documents
    from engine.session import ReadingSession

    session = ReadingSession(smollm2, CacheConfig(sinks=64, window=448, cascades=4), stride=256)
    doc = documents.document_from_text(text_with_fact(14000, back=300), title="kjv excerpt")
    result = session.read(doc)
    assert result.doc_tokens > 3000 and session.doc_cache.n_valid == 512
    answer = "".join(session.ask("What is the secret password of the library?", max_new_tokens=16))
    assert "BLUEBERR" in answer.upper(), answer
    assert session.answers[-1].citations, "an answer cites the passages it attended to"
    # the document's state survives the question: asking again gives the same answer
    again = "".join(session.ask("What is the secret password of the library?", max_new_tokens=16))
    assert again == answer


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_cli_ask_json_contract(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(text_with_fact(6000, back=200))
    proc = run_cli("ask", str(doc), "--question", "What is the secret password of the library?", "--json",
                   "--window", "448", "--sinks", "64", "--stride", "256", "--max-new-tokens", "12", "--quiet",
                   "--cascades", "4", "--recall", "off")  # the cache alone holds the fact (recall: test_recall.py)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("answer", "doc_tokens", "read_seconds", "tokens_per_second", "peak_rss_mb", "cache_slots", "policy",
                "citations", "pipelined"):
        assert key in out, key
    assert isinstance(out["pipelined"], bool)
    assert out["cache_slots"] == 512 and out["policy"] == "cascade" and out["doc_tokens"] > 1000
    assert "BLUEBERR" in out["answer"].upper()


@pytest.mark.parametrize("setup,args,needle", [
    (None, ["ask", "{tmp}/missing.txt", "-q", "x"], "missing.txt"),
    ("empty", ["ask", "{tmp}/empty.txt", "-q", "x"], "empty.txt"),
    ("doc", ["ask", "{tmp}/doc.txt", "-q", "x", "--window", "3", "--cascades", "4"], "too small"),
    ("doc", ["ask", "{tmp}/doc.txt", "-q", "x", "--stride", "0"], "stride"),
    ("doc", ["ask", "{tmp}/doc.txt", "-q", "x", "--model", "./no/such/model"], "model"),
    ("bin", ["ask", "{tmp}/data.bin", "-q", "x"], "data.bin"),
    (None, ["bench", "--window", "2", "--cascades", "3", "--out", "{tmp}/b"], "too small"),
    (None, ["bench", "--lengths", "0", "--out", "{tmp}/b"], "--lengths"),
    (None, ["bench", "--ceiling-max", "0", "--out", "{tmp}/b"], "--ceiling-max"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, setup, args, needle):
    """In this process (`python -m engine` itself runs in test_cli_ask_json_contract): a new interpreter
    per case cost ~7 s of imports each, a minute of the test run."""
    from engine.cli import main

    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "doc.txt").write_text("Some text here.")
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0]
