"""Prepacked bfloat16 linear layers (engine/packed.py): the same numbers as nn.Linear, or not used at all."""

import copy

import pytest
import torch
from torch import nn

from engine.cache import CacheConfig
from engine.models import LoadedModel, default_dtype
from engine.packed import PackedLinear, pack_linears, same_products
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
