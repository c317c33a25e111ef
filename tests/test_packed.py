"""Prepacked bfloat16 linear layers (engine/packed.py): the same numbers as nn.Linear, or not used at all."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.cache import CacheConfig
from engine.models import LoadedModel, default_dtype
from engine import packed as packed_mod
from engine.memory import freeze
from engine.packed import ROW_STEP, PackedLinear, pack_linears, same_products
from engine.runtime import Engine


# Where the CPU computes bfloat16 natively (the product then reads in it), packing must work; elsewhere
# (AVX2 only: float32 by default) oneDNN may refuse bfloat16 packing, and the model stays as it is.
needs_packing = pytest.mark.skipif(default_dtype("cpu") != torch.bfloat16,
                                   reason="this CPU has no native bfloat16, so its default dtype is float32")


def tiny_bf16(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=257, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    return LoadedModel(model=model, tokenizer=None, spec="tiny", model_id="tiny-llama", prompt_format="plain")


def read_and_decode(loaded, ids, steps=6):
    """Logits of a read in chunks (the cascade evicting), then of greedy decode steps. # [tokens, vocab]"""
    engine = Engine(loaded, CacheConfig(sinks=4, window=32, cascades=4), stride=16)
    cache = engine.new_cache()
    outs = [engine.forward(torch.tensor([ids[i:i + 16]]), cache, logits="all") for i in range(0, len(ids), 16)]
    for _ in range(steps):
        nxt = int(outs[-1][0, -1].argmax())
        outs.append(engine.forward(torch.tensor([[nxt]]), cache, logits="last"))
    return torch.cat([o[0] for o in outs])


@needs_packing
def test_packed_model_reads_and_answers_bit_for_bit():
    """Every linear layer (the tied head included) is packed, and a read that evicts plus greedy decoding
    give exactly the unpacked model's logits."""
    plain = tiny_bf16()
    packed = LoadedModel(copy.deepcopy(plain.model), None, "tiny", "tiny-llama", "plain")
    assert pack_linears(packed.model) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert isinstance(packed.model.lm_head, PackedLinear)
    # the tied embedding lookup keeps its own weight
    assert torch.equal(packed.model.model.embed_tokens.weight, plain.model.model.embed_tokens.weight)
    ids = torch.randint(0, 257, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    assert torch.equal(read_and_decode(packed, ids), read_and_decode(plain, ids))


@needs_packing
def test_a_packed_layer_with_other_numbers_is_refused():
    """The load-time check compares products: a layer packed from another weight fails it."""
    torch.manual_seed(0)
    a, b = nn.Linear(64, 32, dtype=torch.bfloat16), nn.Linear(64, 32, dtype=torch.bfloat16)
    assert same_products(PackedLinear(a), a)
    assert not same_products(PackedLinear(a), b)


def test_float32_models_are_not_packed():
    """In float32 oneDNN's packed kernel sums in another order than torch's default: left as it is."""
    model = tiny_bf16().model.float()
    assert pack_linears(model) == 0
    assert all(type(m) is not PackedLinear for m in model.modules())


@needs_packing
def test_a_product_of_any_row_count_is_padded_to_a_multiple_of_the_row_step_with_the_same_numbers(monkeypatch):
    """oneDNN keeps state for every new row count, so products are padded to a bounded set of counts; each
    row's numbers stay those of F.linear over exactly its rows."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, dtype=torch.bfloat16)
    layer = PackedLinear(linear)
    seen = []
    real = packed_mod.product
    monkeypatch.setattr(packed_mod, "product", lambda x, *a: seen.append(x.shape[-2]) or real(x, *a))
    for rows in (1, 2, 45, 64, 65, 130, 511):
        x = torch.randn(1, rows, 64).to(torch.bfloat16)  # [1, rows, in]
        out = layer(x)
        assert out.shape == (1, rows, 96)
        assert torch.equal(out, F.linear(x, linear.weight, linear.bias))
    assert seen == [1, ROW_STEP, ROW_STEP, ROW_STEP, 2 * ROW_STEP, 3 * ROW_STEP, 8 * ROW_STEP]


@needs_packing
def test_with_packed_layers_a_prompt_goes_into_the_answer_tail_in_one_forward_with_unchanged_numbers():
    """Packed layers bound the row counts, so a question's prompt after the document is one forward (not
    powers of two); its logits and tail are exactly those of the unpacked model read the same way."""
    plain = tiny_bf16()
    packed = LoadedModel(copy.deepcopy(plain.model), None, "tiny", "tiny-llama", "plain")
    pack_linears(packed.model)
    ids = torch.randint(0, 257, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    results = {}
    for name, loaded in (("plain", plain), ("packed", packed)):
        engine = Engine(loaded, CacheConfig(sinks=4, window=32, cascades=4), stride=64)
        assert engine.packed_rows == (name == "packed")
        assert engine.shape_state == (name == "plain")  # unpacked bfloat16 still reads powers of two
        engine.shape_state = False  # the reference: the plain model read the same way
        doc = engine.new_cache()
        engine.read([ids], doc)
        calls, forward = [], engine.forward
        engine.forward = lambda x, *a, **k: calls.append(x.shape[1]) or forward(x, *a, **k)
        memory = freeze(doc, tail_slots=64)
        logits = engine.prefill(ids[:45], memory)
        assert calls == [45]
        after = forward(torch.tensor([[5, 6]]), memory, logits="all")  # what the answer's tokens see
        results[name] = (logits, after)
    assert torch.equal(results["packed"][0], results["plain"][0])
    assert torch.equal(results["packed"][1], results["plain"][1])


@needs_packing
def test_a_session_with_packed_layers_meets_the_padded_row_counts_right_after_its_first_read(tiny):
    """The prompt lengths warmed after the first read are 1 and the multiples of the row step up to the
    stride: every row count a question can bring, so answering adds no oneDNN state."""
    from engine import documents, session as session_mod
    from engine.session import ReadingSession
    from engine.corpus import kjv_text

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    assert pack_linears(model) == 15
    loaded = LoadedModel(model, tiny.tokenizer, "tiny", "tiny-packed", "plain")
    session = ReadingSession(loaded, CacheConfig(sinks=8, window=64, cascades=2), stride=256)
    assert session.engine.packed_rows and not session.engine.shape_state
    session.read(documents.document_from_text(kjv_text(max_chars=3000), title="Genesis"))
    assert session_mod._WARM[model] == {1, 64, 128, 192, 256}
