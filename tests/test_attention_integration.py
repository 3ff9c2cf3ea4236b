"""attn_implementation="superexperts_sink" on real transformers models against sdpa / eager."""

import contextlib
import warnings

import pytest
import torch
import transformers
from tiny_models import build_model

import superexperts
from superexperts import attention as sink_attention
from superexperts.collector import StatsCollector, collecting
from superexperts_kernels import _backend
from superexperts_kernels.attention_with_sink import IMPLEMENTATIONS as SINK_OP


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(params=["llama", "qwen3_moe"])
def saved(request, tmp_path):
    superexperts.register()
    model = llama() if request.param == "llama" else build_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    return tmp_path


def load(path, attn):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


def test_equals_sdpa(saved):
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(load(saved, "superexperts_sink")(ids).logits, load(saved, "sdpa")(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_uses_key_padding_mask(saved, side):
    ids = torch.randint(0, 64, (2, 15))
    mask = torch.ones(2, 15, dtype=torch.long)
    real = slice(0, 10) if side == "right" else slice(5, 15)
    mask[1] = 0
    mask[1, real] = 1
    model = load(saved, "superexperts_sink")
    stats = StatsCollector()
    sink_attention._warned.clear()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with collecting(stats):
            ours = model(ids, attention_mask=mask).logits
        ref = load(saved, "sdpa")(ids, attention_mask=mask).logits
    messages = [str(w.message) for w in caught]
    assert not any("cannot express" in m for m in messages)  # the fused kernel ran
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[1, real], ref[1, real], rtol=1e-4, atol=1e-4)
    if side == "right":
        assert int(stats.sink[0].count) == 14 + 9  # queries t >= 1 that are not padding
    else:  # the padded row's sink token is not at position 0: it is left out, with a warning
        assert int(stats.sink[0].count) == 14
        assert any("left padding" in m for m in messages)


def test_packed_sequences_fall_back_to_reference_with_warning(saved, monkeypatch):
    """A pattern the fused kernels cannot express reaches the op as a 4-D mask; the op runs it
    on a backend that honours it (with a warning when that is not the device's default)."""
    ids = torch.randint(0, 64, (1, 16))
    position_ids = torch.cat([torch.arange(7), torch.arange(9)])[None]
    model = load(saved, "superexperts_sink")
    monkeypatch.setattr(_backend, "_warned", set())
    default = SINK_OP.impls[SINK_OP.choose("cpu")]
    expected = contextlib.nullcontext() if "attn_mask" in default.options else pytest.warns(UserWarning, match="cannot express")
    with torch.no_grad(), expected:
        ours = model(ids, position_ids=position_ids, use_cache=False).logits
    with torch.no_grad():
        ref = load(saved, "sdpa")(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:superexperts.attention_with_sink on cpu")
def test_softcap_and_sliding_window_equal_eager(tmp_path):
    """Gemma 2: score soft-capping (through the op's `softcap`) and alternating sliding-window layers."""
    superexperts.register()
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                    sliding_window=6, attn_logit_softcapping=1.0, query_pre_attn_scalar=8)
    model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # scores of a few units, where the cap bends them
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 13))
    stats = StatsCollector()
    with torch.no_grad():
        with collecting(stats):
            ours = load(tmp_path, "superexperts_sink")(ids).logits
        ref = load(tmp_path, "eager")(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert sorted(stats.sink) == [0, 1]


def test_dropout_is_refused(tmp_path):
    superexperts.register()
    model = llama()
    model.config.attention_dropout = 0.1
    model.save_pretrained(tmp_path)
    m = load(tmp_path, "superexperts_sink").train()
    with pytest.raises(ValueError, match="dropout"):
        m(torch.randint(0, 64, (1, 5)))


def test_mask_probe_tells_patterns_apart():
    from transformers.masking_utils import causal_mask_function, chunked_causal_mask_function, sliding_window_causal_mask_function

    probe = sink_attention._pattern_is_expressible
    assert probe(causal_mask_function, 10, 10, 0, 0, None, "cpu")
    assert probe(causal_mask_function, 1, 10, 9, 0, None, "cpu")  # decode step with a cache
    assert not probe(causal_mask_function, 4, 10, 3, 0, None, "cpu")  # static cache: kv longer than positions
    assert probe(sliding_window_causal_mask_function(4), 12, 12, 0, 0, 4, "cpu")
    assert not probe(sliding_window_causal_mask_function(4), 12, 12, 0, 0, None, "cpu")
    assert not probe(chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), 12, 12, 0, 0, 4, "cpu")
