"""A tiny random Llama with a real (word-level) tokenizer, made on the spot: for tests that need the
whole path (tokenizer, session, hub cache) without downloading the default model."""

import torch

WORDS = ("the ark of the covenant was kept in the tent and the people came to see it "
         "where was moses when the cloud covered the mountain").split()


def word_tokenizer(words=WORDS):
    """A transformers fast tokenizer over `words` (others map to [UNK]); ids 0 and 1 are [UNK] and [EOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="[EOS]")


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama (GQA 2:1) in fp32 on the CPU, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=vocab_size, max_position_embeddings=2048,
                         eos_token_id=1, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()
