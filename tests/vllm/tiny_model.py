"""A tiny Qwen3-MoE checkpoint that vLLM's CPU backend runs, with a planted Super Expert
and an offline word-level tokenizer, built with transformers and saved as safetensors.

vLLM's CPU attention needs head_dim in {32, 64, ...}; its grouped GEMMs want dims that
are multiples of 32.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiny_models  # noqa: E402

PLANTED = (1, 5)  # (layer, expert)
DIMS = dict(hidden_size=64, head_dim=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
MAX_LEN = 256


def build(path: Path, plant_scale: float = 300.0):
    """Write the checkpoint and tokenizer to `path`; return the transformers model (fp32)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_models.build_model("qwen3_moe", max_position_embeddings=MAX_LEN, **DIMS)
    tiny_models.plant(model, *PLANTED, scale=plant_scale)
    model.config.eos_token_id = 1
    model.save_pretrained(path)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, tiny_models.VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    return model


def prompts(num: int, length: int, seed: int) -> list[list[int]]:
    """Token-id prompts (ids >= 2: no special tokens)."""
    ids = tiny_models.tokens(num, length, seed=seed) % (tiny_models.VOCAB - 2) + 2
    return ids.tolist()
