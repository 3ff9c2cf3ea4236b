"""Layer streaming, expert/data parallel with gloo, FP8 checkpoints, resumable sweeps."""

import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import build_model, plant, tokens

import superexperts
from superexperts.checkpoint import CheckpointReader, dequantize_fp8_blocks
from superexperts.result import ProfileResult
from superexperts.distributed import ExpertShard
from superexperts.loading import LayerLoader, build_skeleton
from superexperts.streaming import StreamStats, stream_profile
from superexperts.layers import find_layers

OURS = dict(experts_implementation="superexperts", attn_implementation="superexperts_sink")


def same_stats(a: ProfileResult, b: ProfileResult) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ[:5]


def _save_checkpoint(family, path):
    superexperts.register()
    model = build_model(family)
    moe = [p.index for p in find_layers(model) if p.is_moe]
    plant(model, moe[0], 1)
    model.save_pretrained(path, max_shard_size="40KB")  # several shards and an index file
    return family, path


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3", "gpt_oss"])
def checkpoint(request, tmp_path_factory):
    return _save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def gloo_checkpoint(request, tmp_path_factory):
    """Two families for the (slower) multi-process tests: plain MoE, and dense + shared experts."""
    return _save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@contextlib.contextmanager
def one_thread():
    """Ranks run with one ATen thread each; the single-process run they are compared with must
    too: GEMM and reduction results may differ in the last bit with the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_memory(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **OURS).eval()
    return superexperts.profile(model, ids, progress=False)


def test_streaming_equals_in_memory_with_one_layer_resident(checkpoint):
    family, path = checkpoint
    assert (path / "model.safetensors.index.json").is_file()
    ids = tokens(3, 16)
    memory = StreamStats()
    streamed = stream_profile(path, ids, dtype="float32", progress=False, memory=memory)
    same_stats(streamed, in_memory(path, ids))
    assert streamed.super_experts() == in_memory(path, ids).super_experts()

    full = sum(p.numel() * p.element_size() for p in transformers.AutoModelForCausalLM.from_pretrained(path).parameters())
    largest_layer = max(memory.layer_param_bytes)
    assert memory.peak_param_bytes <= memory.base_param_bytes + largest_layer
    assert memory.peak_param_bytes < 0.6 * full  # three layers: one resident at a time


def test_offloaded_hidden_states_give_the_same_stats(checkpoint):
    family, path = checkpoint
    ids = tokens(2, 12)
    a = stream_profile(path, ids, dtype="float32", progress=False, batch_size=2)
    b = stream_profile(path, ids, dtype="float32", progress=False, batch_size=2, offload_hidden=True)
    same_stats(a, b)


def test_expert_shard_reads_its_share_of_expert_weights(checkpoint):
    family, path = checkpoint
    model = build_skeleton(path, dtype=torch.float32, device=torch.device("cpu"))
    parts = find_layers(model)
    layer = next(p for p in parts if p.is_moe)
    total = layer.experts.num_experts

    def expert_bytes(shard):
        loader = LayerLoader(model, path, dtype=torch.float32, device=torch.device("cpu"))
        keys = [k for k in loader.reader.layer_keys[layer.index] if ".experts." in k]
        before = loader.reader.bytes_read
        loader.reader.read(keys, dtype=torch.float32, expert_range=shard, num_experts=total)
        return loader.reader.bytes_read - before

    whole = expert_bytes(None)
    half = expert_bytes((0, total // 2))
    assert half == pytest.approx(whole / 2, rel=0.01)

    loader = LayerLoader(model, path, dtype=torch.float32, device=torch.device("cpu"))
    loader.load_layer(layer.index, layer, ExpertShard(total // 2, total - total // 2, total))
    assert layer.experts.down_proj.shape[0] == total - total // 2
    full = transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(layer.experts.down_proj, find_layers(full)[layer.index].experts.down_proj[total // 2 :])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, path, out, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from superexperts.distributed import process_group

    # Left as the CLI leaves it: a gloo group released in the interpreter's teardown can abort
    # the process ("terminate called without an active exception").
    with process_group(timeout_s=120, checkpoint_dir=None):
        result = stream_profile(path, tokens(4, 16), dtype="float32", progress=False, parallel=mode)
    if rank == 0:
        result.save(out)
    else:
        assert result is None


@pytest.mark.parametrize("mode", ["expert", "data"])
def test_two_gloo_ranks_equal_one_process(gloo_checkpoint, tmp_path, mode):
    family, path = gloo_checkpoint
    mp.spawn(_rank, args=(2, _free_port(), str(path), str(tmp_path), mode), nprocs=2)
    with one_thread():
        single = stream_profile(path, tokens(4, 16), dtype="float32", progress=False)
    same_stats(ProfileResult.load(tmp_path), single)


def _to_fp8_checkpoint(src, dst, block=16):
    """Rewrite a checkpoint in the DeepSeek-V3/R1 FP8 format: 2-D linear weights of the decoder
    layers as float8_e4m3fn with a float32 ``weight_scale_inv`` per block x block tile."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, {}
    for key, w in tensors.items():
        is_linear = key.startswith("model.layers.") and key.endswith(".weight") and w.dim() == 2 and "norm" not in key
        if not is_linear or ".mlp.gate.weight" in key:
            out[key] = dequantized[key] = w
            continue
        rows, cols = w.shape
        r_blocks, c_blocks = -(-rows // block), -(-cols // block)
        padded = torch.zeros(r_blocks * block, c_blocks * block)
        padded[:rows, :cols] = w
        tiles = padded.view(r_blocks, block, c_blocks, block)
        scale = tiles.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max
        q = (tiles / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
        out[key], out[key + "_scale_inv"] = q, scale
        dequantized[key] = dequantize_fp8_blocks(q, scale, torch.float32)
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (dst / "config.json").write_text(json.dumps(config))
    return dequantized


def test_fp8_block_scaled_checkpoint_is_dequantized_per_layer(tmp_path):
    superexperts.register()
    src = tmp_path / "bf16"
    build_model("deepseek_v3").save_pretrained(src)
    dequantized = _to_fp8_checkpoint(src, tmp_path / "fp8")
    reader = CheckpointReader(tmp_path / "fp8")
    assert any(k.endswith("weight_scale_inv") for k in reader.weight_map)

    reference_dir = tmp_path / "dequantized"
    reference_dir.mkdir()
    save_file(dequantized, str(reference_dir / "model.safetensors"))
    (reference_dir / "config.json").write_text((src / "config.json").read_text())

    ids = tokens(2, 16)
    same_stats(stream_profile(tmp_path / "fp8", ids, dtype="float32", progress=False), in_memory(reference_dir, ids))


class _Interrupt(Exception):
    pass


def test_streaming_resume_after_interrupt(checkpoint, tmp_path, monkeypatch):
    family, path = checkpoint
    ids = tokens(3, 16)
    uninterrupted = stream_profile(path, ids, dtype="float32", progress=False)
    real_load = LayerLoader.load_layer

    def fail_on_layer_2(self, index, *args, **kwargs):
        if index == 2:
            raise _Interrupt
        return real_load(self, index, *args, **kwargs)

    monkeypatch.setattr(LayerLoader, "load_layer", fail_on_layer_2)
    with pytest.raises(_Interrupt):
        stream_profile(path, ids, dtype="float32", progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setattr(LayerLoader, "load_layer", real_load)
    state = json.loads((tmp_path / "state.0.json").read_text())
    assert state["steps"][-1]["progress"] == 2  # layers 0 and 1 finished and saved

    loaded = []

    def counting(self, index, *args, **kwargs):
        loaded.append(index)
        return real_load(self, index, *args, **kwargs)

    monkeypatch.setattr(LayerLoader, "load_layer", counting)
    resumed = stream_profile(path, ids, dtype="float32", progress=False, checkpoint_dir=tmp_path, resume=True)
    assert loaded == [2]
    same_stats(resumed, uninterrupted)


def test_in_memory_resume_after_interrupt(checkpoint, tmp_path):
    family, path = checkpoint
    ids = tokens(5, 12)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **OURS).eval()
    uninterrupted = superexperts.profile(model, ids, progress=False)

    calls = []

    def interrupt_third_batch(module, inputs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = model.base_model.register_forward_pre_hook(interrupt_third_batch)
    with pytest.raises(KeyboardInterrupt):
        superexperts.profile(model, ids, progress=False, checkpoint_dir=tmp_path)
    handle.remove()
    assert json.loads((tmp_path / "state.0.json").read_text())["steps"][-1]["progress"] == 2

    resumed = superexperts.profile(model, ids, progress=False, checkpoint_dir=tmp_path, resume=True)
    same_stats(resumed, uninterrupted)
    with pytest.raises(ValueError, match="other settings"):
        superexperts.profile(model, tokens(5, 12, seed=9), progress=False, checkpoint_dir=tmp_path, resume=True)


def test_torchrun_cli_expert_parallel(tmp_path):
    superexperts.register()
    model_dir = tmp_path / "model"
    build_model("qwen3_moe").save_pretrained(model_dir)
    calib = tmp_path / "calib.npy"
    import numpy as np

    np.save(calib, tokens(4, 16).numpy())
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "superexperts", "profile", "--model", str(model_dir), "--calib", str(calib), "--seq-len", "16",
           "--num-samples", "4", "--parallel", "expert", "--dtype", "float32", "--out", str(out), "--no-plots"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    from superexperts.calibration import load_calibration

    same_windows = load_calibration(calib, seq_len=16, num_samples=4)  # the CLI's seeded choice of rows
    with one_thread():
        single = stream_profile(model_dir, same_windows, dtype="float32", progress=False)
    assert [(s["layer"], s["expert"]) for s in report["super_experts"]] == [(s.layer, s.expert) for s in single.super_experts()]
    same_stats(ProfileResult.load(out), single)
