"""Evaluation harness: scoring, needle placement, resumable grids and written reports."""

import argparse
import json

import pytest
import torch

from engine import evaluate
from engine.evaluate import DEPTH_BANDS, digits_score, passkey_prompt


@pytest.mark.parametrize("answer,key,exact,per_digit", [
    (" 12345.", "12345", True, 1.0),
    ("The pass key is 12395", "12345", False, 0.8),
    ("no digits", "12345", False, 0.0),
    ("1234", "12345", False, 0.8),
])
def test_digit_scores(answer, key, exact, per_digit):
    assert digits_score(answer, key) == (exact, pytest.approx(per_digit))


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.55, 0.95])
def test_needle_lands_at_its_depth(smollm2, depth):
    tok = smollm2.tokenizer
    ids, at = passkey_prompt(tok, 2000, depth, "40417")
    assert abs(len(ids) - 2000) < 20
    text = tok.decode(ids)
    assert text.count("40417") == 2
    assert abs(at / len(ids) - depth) < 0.05
    assert "40417" in tok.decode(ids[at:at + 20])


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(smollm2.tokenizer),
                         max_position_embeddings=4096)
    return LoadedModel(LlamaForCausalLM(config).eval(), smollm2.tokenizer, "tiny", "tiny-eval", "plain")


def eval_args(tmp_path, task, **kw):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    argv = [task, "--out", str(tmp_path), "--window", "32", "--sinks", "16", "--stride", "32"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, list) else [v])]
    return parser.parse_args(argv)


def test_passkey_grid_is_resumable_and_reported(tmp_path, tiny_with_tokenizer, monkeypatch):
    import engine.models

    monkeypatch.setattr(engine.models, "load_model", lambda *a, **k: tiny_with_tokenizer)
    args = eval_args(tmp_path, "passkey", lengths_x=[1, 2], policies=["cascade", "sink"])
    evaluate.run_passkey(args)
    lines = (tmp_path / "passkey.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(DEPTH_BANDS) * 2
    assert all({"exact", "per_digit", "answer"} <= set(json.loads(line)) for line in lines)
    evaluate.run_passkey(args)  # nothing left to do: no case runs twice
    assert (tmp_path / "passkey.jsonl").read_text().splitlines() == lines
    args = eval_args(tmp_path, "passkey", lengths_x=[1, 2, 4], policies=["cascade", "sink"])
    evaluate.run_passkey(args)  # a bigger grid only adds the missing cases
    assert len((tmp_path / "passkey.jsonl").read_text().splitlines()) == 3 * len(DEPTH_BANDS) * 2
    for name in ("passkey.json", "passkey.png", "passkey.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| cascade |" in (tmp_path / "passkey.md").read_text()


def test_ppl_reports_every_policy(tmp_path, tiny_with_tokenizer, monkeypatch):
    import engine.models

    monkeypatch.setattr(engine.models, "load_model", lambda *a, **k: tiny_with_tokenizer)
    args = eval_args(tmp_path, "ppl", tokens=200, buckets=4, policies=["cascade", "sink", "full"])
    result = evaluate.run_ppl(args)
    rows = {r["case"]["policy"]: r for r in result["rows"]}
    assert set(rows) == {"cascade", "sink", "full"}
    vocab = len(tiny_with_tokenizer.tokenizer)
    for r in rows.values():  # a random model: NLL near log(vocab), and finite
        assert 0.5 * torch.log(torch.tensor(vocab)) < r["nll"] < 2 * torch.log(torch.tensor(vocab))
        assert len(r["curve"]) == 4
    assert (tmp_path / "ppl.png").exists() and "| full |" in (tmp_path / "ppl.md").read_text()
