"""The architectures users bring, as tiny random models built from their transformers config classes:
chunked reading reproduces transformers' own logits while nothing is evicted, the cascade's
invariants hold once it evicts, and an architecture we cannot run exactly is refused in one line."""

import pytest
import torch
import transformers as tf

from conftest import device_under_test, reference_logits
from engine.architectures import SUPPORTED
from engine.cache import CacheConfig, HybridCache
from engine.errors import UserError
from engine.models import LoadedModel, load_model
from engine.runtime import Engine

VOCAB = 257
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHITECTURES = {  # name -> (config class, model class, what makes it that architecture)
    "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(  # Llama-3.1's RoPE scaling, short enough to matter here
        head_dim=16, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict()),  # q/k/v biases
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16)),  # q/k RMS norms before RoPE
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(head_dim=16, sliding_window=None)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict()),  # fused qkv and gate/up projections
    "phi4-mini": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(partial_rotary_factor=0.5)),  # RoPE on half of each head
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(  # q/k norms, sliding layers, two rotaries
        head_dim=16, sliding_window=48, layer_types=["sliding_attention", "full_attention"])),
}


def tiny(name: str) -> LoadedModel:
    config_class, model_class, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = model_class(config_class(**{**COMMON, **extra})).eval().to(device_under_test())
    return LoadedModel(model=model, tokenizer=None, spec=name, model_id=name, prompt_format="plain")


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return tiny(request.param)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def read_logits(engine, ids, stride):
    cache = engine.new_cache()
    chunks = [engine.forward(torch.tensor([ids[i:i + stride]]), cache, logits="all") for i in range(0, len(ids), stride)]
    return torch.cat(chunks, dim=1), cache


def test_every_tested_architecture_is_listed_as_supported():
    types = {config_class.model_type for config_class, _, _ in ARCHITECTURES.values()}
    assert types == set(SUPPORTED)


@pytest.mark.parametrize("stride", [7, 64])
def test_chunked_reading_reproduces_transformers_logits(arch, stride):
    ids = random_ids(200, 1)
    engine = Engine(arch, CacheConfig(policy="cascade", sinks=4, window=200, cascades=4), stride=stride)
    got, cache = read_logits(engine, ids, stride)
    want = reference_logits(arch, ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert cache.n_valid == 200


def test_greedy_answer_equals_transformers_argmax(arch):
    ids = random_ids(90, 2)
    engine = Engine(arch, CacheConfig(sinks=4, window=256, cascades=2), stride=32)
    cache = engine.new_cache()
    engine.read([ids], cache)
    seq = ids + [5, 6, 7]
    for token in engine.generate(cache, [5, 6, 7], max_new_tokens=4):
        assert token == int(reference_logits(arch, seq)[0, -1].argmax())
        seq.append(token)


def test_cascade_invariants_after_eviction(arch):
    sinks, window, cascades, stride, n = 4, 32, 4, 16, 600
    engine = Engine(arch, CacheConfig(sinks=sinks, window=window, cascades=cascades), stride=stride)
    _, cache = read_logits(engine, random_ids(n, 3), stride)
    main = cache.main if isinstance(cache, HybridCache) else cache
    assert main.n_valid == sinks + window and main.seen == n
    assert int(main.plan(stride).chunk_pos.max()) < sinks + window + stride  # RoPE never beyond S + W + stride
    w = window // cascades
    ring0 = slice(sinks, sinks + w)  # cascade 0 takes every token: it holds exactly the last w
    for layer in range(main.n_layers):
        pos = main.pos[layer][0].cpu()  # [kv_heads, slots]
        assert torch.equal(pos[:, :sinks], torch.arange(sinks).expand_as(pos[:, :sinks]))
        assert torch.equal(pos[:, ring0].sort(dim=1).values, torch.arange(n - w, n).expand(pos.shape[0], w))
        for head in pos:
            assert len(set(head.tolist())) == sinks + window  # every slot filled, no token twice
            assert int(head.min()) == 0 and int(head[sinks:].min()) < n - window  # reaches behind a plain window
    if isinstance(cache, HybridCache):  # Gemma-3's sliding layers keep their own window of the latest tokens
        keep = cache.sliding_window - 1
        for layer in range(cache.sliding.n_layers):
            held = cache.sliding.pos[layer][0].cpu().sort(dim=1).values
            assert torch.equal(held, torch.arange(n - keep, n).expand_as(held))


@pytest.mark.parametrize("config_class,model_type", [(tf.Gemma2Config, "gemma2"), (tf.GPT2Config, "gpt2")])
def test_unsupported_architecture_is_refused_in_one_line(config_class, model_type, tmp_path):
    config = config_class(**{k: v for k, v in COMMON.items() if k in config_class().to_dict()})
    # a folder with a config and no weights: the refusal comes from the config, before anything heavy loads
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path), dtype="float32", device="cpu", say=lambda s: None)
    message = str(err.value)
    assert "\n" not in message and f"'{model_type}'" in message and all(t in message for t in SUPPORTED)


def test_sliding_window_everywhere_bounds_the_cache():
    config_class, model_class, extra = ARCHITECTURES["mistral"]
    torch.manual_seed(0)
    model = model_class(config_class(**{**COMMON, **extra, "sliding_window": 64})).eval().to(device_under_test())
    slides = LoadedModel(model, None, "m", "m", "plain")
    with pytest.raises(UserError, match="sliding window of 64 tokens.*lower --window"):
        Engine(slides, CacheConfig(sinks=4, window=64, cascades=4), stride=16)
    with pytest.raises(UserError, match="full"):
        Engine(slides, CacheConfig(policy="full"), stride=16)
    # within the window the model reads exactly as transformers does (its mask never bites)
    ids = random_ids(48, 4)
    got, _ = read_logits(Engine(slides, CacheConfig(sinks=4, window=44, cascades=4), stride=16), ids, 16)
    assert torch.allclose(got, reference_logits(slides, ids), atol=1e-4)
