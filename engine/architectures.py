"""Which transformers architectures the engine runs exactly, and the check that refuses the others.

The engine takes each model's own q/k/v projections (biases, fused qkv, q/k norms included) and
replaces only the attention over keys and values, rotating keys at positions inside the cache with
the model's own rotary module. That is exact for decoder-only models whose attention is plain
softmax attention with rotary positions applied after the projections (and norms). Each listed
type has a test that reads a tiny random model in chunks and reproduces transformers' logits
(tests/test_architectures.py). Others are refused before reading: e.g. Gemma-2 soft-caps attention
logits, GPT-2 has no rotary positions, multimodal Gemma-3 wraps its language model differently.
"""

from __future__ import annotations

from .errors import UserError

SUPPORTED: dict[str, str] = {  # config.model_type -> what it covers
    "llama": "Llama 2/3/3.1/3.2 (llama3 RoPE scaling), SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2, Qwen2.5 (q/k/v biases)",
    "qwen3": "Qwen3 dense (q/k norm)",
    "phi3": "Phi-3, Phi-3.5, Phi-4-mini (fused qkv, partial rotary)",
    "gemma3_text": "Gemma-3 text models 270M and 1B (sliding-window layers, q/k norm)",
}


def check_architecture(config, what: str = "model") -> None:
    """Refuse, in one line naming it and the supported list, a config the engine cannot run exactly."""
    model_type = getattr(config, "model_type", None) or type(config).__name__
    if model_type not in SUPPORTED:
        raise UserError(f"{what}: architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED)}")
    if getattr(config, "attn_logit_softcapping", None):
        raise UserError(f"{what}: '{model_type}' with attention logit soft-capping is not supported")


def sliding_everywhere(config) -> int | None:
    """The window of a model whose every layer slides (Mistral v0.1, Phi-3-mini-4k), else None.

    Models that list layer_types slide only on the layers named "sliding_attention" (Gemma-3); their
    cache keeps those layers in a window of their own (cache.HybridCache), so no limit applies here."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "layer_types", None):
        return None
    return int(window)


def check_positions(model_config, cache_config, extra: int, what: str = "stride") -> None:
    """Refuse settings under which the newest query would see a key farther than a sliding-window
    model ever looks: in-cache distances reach sinks + window + `extra` (the stride while reading,
    the answer tail while answering), and the full policy has no bound at all."""
    window = sliding_everywhere(model_config)
    if window is None:
        return
    name = getattr(model_config, "model_type", "this model")
    if cache_config.policy == "full":
        raise UserError(f"{name} attends within a sliding window of {window} tokens on every layer, so the full "
                        "policy would show it more than it ever sees; use the cascade or sink policy")
    need = cache_config.sinks + cache_config.window + extra
    if need > window:
        raise UserError(f"{name} attends within a sliding window of {window} tokens on every layer; sinks + window "
                        f"+ {what} ({need}) must fit in it: lower --window")
