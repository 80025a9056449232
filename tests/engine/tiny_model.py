"""A tiny random Qwen3-MoE checkpoint and a word-level tokenizer, written locally (no
downloads) for the engine and server tests."""

from __future__ import annotations

import random
from pathlib import Path

VOCAB_SIZE = 512
NUM_EXPERTS = 8
TOP_K = 2
SEED = 0
INIT_STD = 0.15
"""Weight scale: large enough that greedy picks win by clear margins (the tests compare
token ids exactly), small enough that activations stay far from bf16 overflow."""


def write_checkpoint(folder: Path) -> Path:
    """Write a 2-layer Qwen3-MoE (8 experts, top-2, hidden 128, bf16) with random weights
    and its tokenizer to `folder`; return `folder`."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        max_position_embeddings=512,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_word_level_tokenizer(),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.save_pretrained(folder)
    return folder


def prompts(count: int, seed: int = SEED) -> list[list[int]]:
    """`count` prompts of token ids (lengths 3 to 24, none of the special ids 0-2)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(3, 24))] for _ in range(count)]


def _word_level_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, VOCAB_SIZE))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer
