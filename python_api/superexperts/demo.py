"""The built-in demo: a tiny Qwen3-MoE whose planted Super Experts make a real attention sink.

`build_demo(out_dir)` writes, offline and deterministically:

- ``model/``: a `Qwen3MoeForCausalLM` (6 layers, 128 experts, top-8: Qwen3-30B-A3B's
  routing in miniature) saved as safetensors, with a word-level tokenizer;
- ``calibration.txt`` and ``eval.txt``: text from the class-based Markov chain the model
  was built to predict.

How the weights make the mechanism real rather than a big number:

1. Every window starts with ``<s>``, the only token carrying channel `BOS_CHANNEL`.
2. Layer 1 routes that token to expert 68 (router row reads `BOS_CHANNEL`); its gate fires
   only on that channel and its down_proj writes a large value into residual channel
   `MASSIVE_CHANNEL`. Layers 2 and 3 route the first token to experts 92 and 82 by the
   massive channel itself and amplify it: a massive activation on the first token.
3. In layers 2-5 every query reads channel `CONST_CHANNEL` (carried by all tokens) into
   the lowest-frequency RoPE pair of its head, and the keys read `MASSIVE_CHANNEL` into the
   same pair (q/k norms scaled up), so the first token's key points where every query points:
   an attention sink. Its value is nearly zero (after the input norm the first token is
   almost one-hot on the massive channel, which ``v_proj`` does not read), so heads that
   sink do nothing, as in real models.
4. The residual stream otherwise carries the current token's class, and ``lm_head`` turns it
   into the chain's exact next-token log-probabilities. Attention values carry the class
   shifted by one, so heads that do not sink corrupt the prediction.

Pruning the three experts removes the massive activation, the sink disappears (D_sink near
100% in layers 2-5) and perplexity rises. The planted experts match the published
Qwen3-30B-A3B Super Experts: (1, 68), (2, 92), (3, 82).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

NUM_CLASSES = 8
WORDS_PER_CLASS = 25
SPECIALS = ["<unk>", "<s>", "</s>"]
HIDDEN = 64
HEAD_DIM = 16
NUM_HEADS = 4
NUM_KV_HEADS = 2
NUM_LAYERS = 6
NUM_EXPERTS = 128
TOP_K = 8
MOE_INTER = 16

CONST_CHANNEL = NUM_CLASSES  # carried by every token
BOS_CHANNEL = NUM_CLASSES + 1  # carried by <s> only
MASSIVE_CHANNEL = 40
NOISE_CHANNELS = [c for c in range(NUM_CLASSES + 2, HIDDEN) if c != MASSIVE_CHANNEL]

# (layer, expert, down_proj output it writes into MASSIVE_CHANNEL, trigger channel)
PLANTED = [(1, 68, 744.0, BOS_CHANNEL), (2, 92, 540.0, MASSIVE_CHANNEL), (3, 82, 430.0, MASSIVE_CHANNEL)]
SINK_LAYERS = range(2, NUM_LAYERS)

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pu", "da", "fe", "gi", "ho", "ju"]
_SUFFIXES = ["an", "el", "is", "or", "um", "ax", "et", "oz"]


@dataclass(frozen=True)
class Demo:
    model_dir: Path
    calibration: Path
    eval: Path
    planted: list[tuple[int, int]]


def _words() -> list[list[str]]:
    """NUM_CLASSES classes of WORDS_PER_CLASS distinct pseudo-words (the suffix marks the class)."""
    classes = []
    for k in range(NUM_CLASSES):
        words = []
        for i in range(WORDS_PER_CLASS):
            a, b = divmod(i * 7 + k, len(_SYLLABLES))
            words.append(_SYLLABLES[a % len(_SYLLABLES)] + _SYLLABLES[b] + _SUFFIXES[k])
        classes.append(words)
    return classes


def _chain(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class transition matrix ``[K, K]`` and per-class word distributions ``[K, W]``."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.full((NUM_CLASSES, NUM_CLASSES), 0.1 / (NUM_CLASSES - 2))
    for k in range(NUM_CLASSES):
        trans[k, (k + 1) % NUM_CLASSES] = 0.6
        trans[k, (k + 3) % NUM_CLASSES] = 0.3
    ranks = torch.arange(1, WORDS_PER_CLASS + 1, dtype=torch.float)
    word_probs = torch.stack([(1.0 / ranks)[torch.randperm(WORDS_PER_CLASS, generator=g)] for _ in range(NUM_CLASSES)])
    return trans / trans.sum(1, keepdim=True), word_probs / word_probs.sum(1, keepdim=True)


def generate_text(num_words: int, seed: int) -> str:
    """Text from the Markov chain: class by the transition matrix, word by its class distribution."""
    trans, word_probs = _chain()
    words = _words()
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(NUM_CLASSES, (1,), generator=g))
    out = []
    for i in range(num_words):
        w = int(torch.multinomial(word_probs[k], 1, generator=g))
        out.append(words[k][w])
        k = int(torch.multinomial(trans[k], 1, generator=g))
        if i % 16 == 15:
            out.append("\n")
    return " ".join(out).replace(" \n ", "\n")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for words in _words():
        for w in words:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(SPECIALS) + NUM_CLASSES * WORDS_PER_CLASS,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        moe_intermediate_size=MOE_INTER,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_model(seed: int = 0):
    """The demo `Qwen3MoeForCausalLM` with its planted weights, in fp32, in eval mode."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = _config()
    model = Qwen3MoeForCausalLM(config).eval()
    trans, word_probs = _chain()
    vocab = config.vocab_size

    def small(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # Token embeddings: class one-hot, the constant channel, and a per-word unit direction in
        # the remaining channels (it spreads the routing over the experts; lm_head ignores it).
        emb = model.model.embed_tokens.weight
        for k in range(NUM_CLASSES):
            ids = torch.arange(WORDS_PER_CLASS) + len(SPECIALS) + k * WORDS_PER_CLASS
            emb[ids, k] = 1.0
        emb[:, CONST_CHANNEL] = 1.0
        emb[1, BOS_CHANNEL] = 1.0  # <s>
        noise = small(vocab - len(SPECIALS), len(NOISE_CHANNELS), std=1.0)
        emb[len(SPECIALS):, NOISE_CHANNELS] = noise / noise.norm(dim=1, keepdim=True)

        # Final norm undoes the RMS of a clean token state (three unit components), lm_head gives
        # the chain's log-probs.
        model.model.norm.weight.fill_(math.sqrt(3.0 / HIDDEN))
        head = model.lm_head.weight
        log_word = torch.full((vocab,), -30.0)
        for k in range(NUM_CLASSES):
            ids = torch.arange(WORDS_PER_CLASS) + len(SPECIALS) + k * WORDS_PER_CLASS
            log_word[ids] = word_probs[k].log()
            head[ids, :NUM_CLASSES] = trans[:, k].log()  # row: next word's class given current class
        head[:, CONST_CHANNEL] = log_word

        for index, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            _attention_weights(layer.self_attn, sink=index in SINK_LAYERS)
            experts, router = layer.mlp.experts, layer.mlp.gate
            router.weight[:, NOISE_CHANNELS] = small(NUM_EXPERTS, len(NOISE_CHANNELS), std=0.5)
            experts.gate_up_proj.copy_(small(NUM_EXPERTS, 2 * MOE_INTER, HIDDEN, std=0.05))
            experts.down_proj.copy_(small(NUM_EXPERTS, HIDDEN, MOE_INTER, std=0.05))
            experts.gate_up_proj[:, :, [MASSIVE_CHANNEL, BOS_CHANNEL]] = 0.0
            experts.down_proj[:, [MASSIVE_CHANNEL, BOS_CHANNEL], :] = 0.0
        for layer_index, expert, value, trigger in PLANTED:
            _plant(model.model.layers[layer_index].mlp, expert, value, trigger)
    return model


def _attention_weights(attn, *, sink: bool) -> None:
    """Sink heads (see the module docstring); other layers' attention is a no-op."""
    attn.q_norm.weight.fill_(1.0)
    attn.k_norm.weight.fill_(1.0)
    if not sink:
        return
    low = HEAD_DIM // 2 - 1  # first dim of the lowest-frequency RoPE pair
    for h in range(NUM_HEADS):
        attn.q_proj.weight[h * HEAD_DIM + low, CONST_CHANNEL] = 1.0
    for h in range(NUM_KV_HEADS):
        attn.k_proj.weight[h * HEAD_DIM + low, MASSIVE_CHANNEL] = 1.0
        attn.k_proj.weight[h * HEAD_DIM, CONST_CHANNEL] = 0.01  # other keys: a fast pair, orthogonal to q
        for k in range(NUM_CLASSES):
            attn.v_proj.weight[h * HEAD_DIM + k, k] = 1.0
    attn.q_norm.weight.fill_(2.5)
    attn.k_norm.weight.fill_(2.5)
    for h in range(NUM_HEADS):
        for k in range(NUM_CLASSES):
            attn.o_proj.weight[(k + 1) % NUM_CLASSES, h * HEAD_DIM + k] = 0.06


def _plant(moe, expert: int, value: float, trigger: int) -> None:
    """Route the first token to `expert` and make its down_proj write `value` into the massive channel."""
    moe.gate.weight[expert, trigger] = 50.0
    gate_up, down = moe.experts.gate_up_proj[expert], moe.experts.down_proj[expert]
    gate_up[[0, MOE_INTER]] = 0.0
    gate_up[0, trigger] = 1.0  # gate
    gate_up[MOE_INTER, trigger] = 1.0  # up
    down[:, 0] = 0.0
    down[MASSIVE_CHANNEL, 0] = 1.0  # rescaled to `value` by _calibrate_planted


def _calibrate_planted(model, tokenizer) -> None:
    """Scale each planted down_proj entry so the expert's output on <s> is exactly its target."""
    ids = torch.tensor([[tokenizer.bos_token_id]])
    for layer_index, expert, value, _ in PLANTED:
        moe = model.model.layers[layer_index].mlp
        captured = {}

        def grab(module, inputs, output, captured=captured):
            captured["x"] = inputs[0][0, 0].detach().clone()

        handle = moe.register_forward_hook(grab)
        with torch.no_grad():
            model(ids)
        handle.remove()
        x = captured["x"]
        gate_up = x @ moe.experts.gate_up_proj[expert].T
        act = torch.nn.functional.silu(gate_up[0]) * gate_up[MOE_INTER]
        with torch.no_grad():
            moe.experts.down_proj[expert, MASSIVE_CHANNEL, 0] = value / float(act)


def build_demo(out_dir: str | Path, *, calibration_words: int = 6000, eval_words: int = 6000) -> Demo:
    """Write the demo model, tokenizer and text files under `out_dir`."""
    out = Path(out_dir)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    model = build_model()
    _calibrate_planted(model, tokenizer)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calibration, evaluation = out / "calibration.txt", out / "eval.txt"
    calibration.write_text(generate_text(calibration_words, seed=1))
    evaluation.write_text(generate_text(eval_words, seed=2))
    return Demo(model_dir, calibration, evaluation, [(layer, expert) for layer, expert, _, _ in PLANTED])
