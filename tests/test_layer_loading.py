"""Layer loading for streaming: in-place fused conversion, the background reader, per-layer
arguments computed once per batch, and the memory bound."""

import math
import re
import threading

import pytest
import torch
import transformers
from tiny_models import build_model, plant, tokens

import superexperts
from superexperts.checkpoint import CheckpointReader
from superexperts.layers import decoder_layers, find_layers
from superexperts.loading import LayerLoadError, LayerLoader, build_skeleton
from superexperts.result import ProfileResult
from superexperts.streaming import StreamStats, layer_arguments, stream_profile

CPU = torch.device("cpu")


def same_stats(a: ProfileResult, b: ProfileResult) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ[:5]


def _save(family, path, **overrides):
    superexperts.register()
    model = build_model(family, **overrides)
    moe = [p.index for p in find_layers(model) if p.is_moe]
    plant(model, moe[0], 1)
    model.save_pretrained(path, max_shard_size="40KB")  # several shards and an index file
    return path


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen3_next"])
def checkpoint(request, tmp_path_factory):
    return request.param, _save(request.param, tmp_path_factory.mktemp(request.param))


def _layer_tensors(path, index, *, in_place: bool, background: bool = False) -> dict[str, torch.Tensor]:
    model = build_skeleton(path, dtype=torch.float32, device=CPU)
    parts = find_layers(model)
    with LayerLoader(model, path, dtype=torch.float32, device=CPU, in_place=in_place, background=background) as loader:
        loader.prefetch(index, parts[index])
        layer = loader.load_layer(index, parts[index])
        return {k: v.clone() for k, v in layer.state_dict().items()}


def test_in_place_fusion_equals_transformers_loading(checkpoint):
    """Every layer tensor written in place (or by transformers' ops) equals what
    from_pretrained loads, bit for bit."""
    family, path = checkpoint
    full = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    for index, layer in enumerate(decoder_layers(full)):
        want = layer.state_dict()
        for in_place in (True, False):
            got = _layer_tensors(path, index, in_place=in_place, background=in_place)
            assert set(got) == set(want)
            for name in want:
                assert got[name].dtype == want[name].dtype, name
                assert torch.equal(got[name], want[name]), (family, index, name, in_place)


@pytest.mark.parametrize("background", [False, True])
def test_freed_layer_buffers_are_refilled_exactly_by_the_next_read(checkpoint, background):
    """Layer by layer (load, free), a read fills the freed layers' buffers of the same shapes
    again: every layer still equals what from_pretrained loads, its tensors are the old ones
    (kept alive here, so no allocator could hand out their addresses anew), and what the
    loader holds goes back to zero."""
    family, path = checkpoint
    full = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = build_skeleton(path, dtype=torch.float32, device=CPU)
    parts = find_layers(model)
    alive: list[torch.Tensor] = []
    reused = 0
    with LayerLoader(model, path, dtype=torch.float32, device=CPU, background=background) as loader:
        for p, want in zip(parts, decoder_layers(full)):
            layer = loader.load_layer(p.index, p)
            if p.index + 1 < len(parts):
                loader.prefetch(p.index + 1, parts[p.index + 1])
            got = layer.state_dict()
            assert set(got) == set(want.state_dict())
            for name, w in want.state_dict().items():
                assert torch.equal(got[name], w), (family, p.index, name)
            freed = {t.data_ptr() for t in alive}
            reused += sum(t.data_ptr() in freed for t in layer.parameters())
            alive += [t.detach() for t in layer.parameters()]
            loader.free_layer(layer)
        held_after_last = loader.held.now
    assert reused > 0
    assert held_after_last > 0 and loader.held.now == 0  # the last layer's spares, released by close


def test_bf16_checkpoint_read_into_fp32_layers(tmp_path):
    superexperts.register()
    build_model("qwen3_moe").to(torch.bfloat16).save_pretrained(tmp_path)
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    got = _layer_tensors(tmp_path, 1, in_place=True)
    want = decoder_layers(full)[1].state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)


def _reading_threads(monkeypatch) -> dict[str, set[str]]:
    """Record which thread reads each checkpoint key."""
    real = CheckpointReader.tensors
    threads: dict[str, set[str]] = {}

    def recording(self, keys, **kwargs):
        for key, tensor in real(self, keys, **kwargs):
            threads.setdefault(key, set()).add(threading.current_thread().name)
            yield key, tensor

    monkeypatch.setattr(CheckpointReader, "tensors", recording)
    return threads


def test_prefetch_equals_sequential_bit_for_bit(checkpoint, monkeypatch):
    family, path = checkpoint
    ids = tokens(3, 16)
    threads = _reading_threads(monkeypatch)
    background = stream_profile(path, ids, dtype="float32", progress=False, batch_size=2, prefetch=True)
    layer_readers = {name for key, names in threads.items() if ".layers." in key for name in names}
    assert {n.split("_")[0] for n in layer_readers} == {"superexperts-read"}
    threads.clear()
    sequential = stream_profile(path, ids, dtype="float32", progress=False, batch_size=2, prefetch=False)
    assert {name for names in threads.values() for name in names} == {threading.current_thread().name}
    same_stats(background, sequential)


def test_memory_bound_one_layer_sequential_two_with_prefetch(checkpoint):
    family, path = checkpoint
    ids = tokens(2, 16)
    for prefetch, layers_held in ((False, 1), (True, 2)):
        memory = StreamStats()
        stream_profile(path, ids, dtype="float32", progress=False, prefetch=prefetch, memory=memory)
        largest = max(memory.layer_param_bytes)
        assert memory.peak_param_bytes <= memory.base_param_bytes + largest
        assert largest <= memory.peak_held_bytes <= layers_held * largest
        if not prefetch:
            assert memory.peak_held_bytes == largest


def test_error_in_prefetch_thread_names_layer_and_file(checkpoint, monkeypatch):
    family, path = checkpoint
    real = CheckpointReader.tensors
    threads = []

    def failing(self, keys, **kwargs):
        for key, tensor in real(self, keys, **kwargs):
            if ".layers.2." in key:
                threads.append(threading.current_thread().name)
                raise OSError("disk went away")
            yield key, tensor

    monkeypatch.setattr(CheckpointReader, "tensors", failing)
    with pytest.raises(LayerLoadError, match=r"layer 2: reading model\.layers\.2\.\S+ in \S+\.safetensors failed: OSError: disk went away") as info:
        stream_profile(path, tokens(2, 16), dtype="float32", progress=False)
    assert isinstance(info.value.__cause__, OSError)
    assert threads and threads[0].startswith("superexperts-read")  # raised on the background thread
    assert not [t for t in threading.enumerate() if t.name.startswith("superexperts-read")]


def test_interrupt_while_a_read_is_in_flight_cancels_it_and_frees_everything(checkpoint, monkeypatch):
    family, path = checkpoint
    loaders = []
    real_prefetch = LayerLoader.prefetch

    def prefetch_then_interrupt(self, index, *args, **kwargs):
        real_prefetch(self, index, *args, **kwargs)
        loaders.append(self)
        if index == 2:
            assert 2 in self._pending  # layer 2 is being read while layer 1 computes
            raise KeyboardInterrupt

    monkeypatch.setattr(LayerLoader, "prefetch", prefetch_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        stream_profile(path, tokens(2, 16), dtype="float32", progress=False)
    loader = loaders[-1]
    assert not loader._pending and loader.held.now == 0
    assert all(p.device.type == "meta" for layer in loader.layers for p in layer.parameters())
    assert not [t for t in threading.enumerate() if t.name.startswith("superexperts-read")]


def test_shape_mismatch_is_refused_before_reading(tmp_path):
    path = _save("qwen3_moe", tmp_path / "ckpt")
    model = build_skeleton(path, dtype=torch.float32, device=CPU)
    parts = find_layers(model)
    experts = parts[0].experts
    experts.down_proj = torch.nn.Parameter(torch.empty(experts.down_proj.shape[0], 31, 16, device="meta"), requires_grad=False)
    loader = LayerLoader(model, path, dtype=torch.float32, device=CPU)
    before = loader.reader.bytes_read
    with pytest.raises(ValueError, match=r"layer 0: the checkpoint tensors of model\.layers\.0\.mlp\.experts\.down_proj make shape \(16, 32, 16\), the model expects \(16, 31, 16\)"):
        loader.load_layer(0, parts[0])
    assert loader.reader.bytes_read == before
    loader.close()


def _forward_arguments(model, ids):
    """What each decoder layer receives in the model's real forward (all but the hidden states)."""
    got = {}

    def pre(module, args, kwargs, index):
        got[index] = (args[1:], kwargs)

    layers = decoder_layers(model)
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            model.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in range(len(layers))]


def _assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("family, attention", [("gpt_oss", "eager"), ("gpt_oss", "superexperts_sink"),
                                               ("qwen3_next", "eager"), ("qwen3_next", "superexperts_sink")])
def test_layer_arguments_equal_the_forward_of_hybrid_models(family, attention):
    """Sliding-window/full (gpt-oss) and linear/full (Qwen3-Next) layers: the arguments kept
    once per batch equal what every layer gets in the model's own forward."""
    superexperts.register()
    model = build_model(family)
    model.set_attn_implementation(attention)
    ids = tokens(2, 16)
    want = _forward_arguments(model, ids)
    shared: list = []
    embeddings, got = layer_arguments(model, ids, shared)
    assert torch.equal(embeddings, model.base_model.get_input_embeddings()(ids))
    assert len(got.per_layer) == len(want)
    for i, (g, w) in enumerate(zip(got.per_layer, want)):
        _assert_same(g, w, f"layer {i}")
    types = model.config.layer_types
    masks = [kw.get("attention_mask") for _, kw in want]
    if attention == "eager" and family == "gpt_oss":  # the test tells layer types apart
        assert not torch.equal(masks[types.index("sliding_attention")], masks[types.index("full_attention")])

    # A second batch of the same shape shares the first one's tensors (one copy kept), and
    # its arguments still equal its own forward's.
    ids2 = tokens(2, 16, seed=5)
    _, got2 = layer_arguments(model, ids2, shared)
    for i, (g, w) in enumerate(zip(got2.per_layer, _forward_arguments(model, ids2))):
        _assert_same(g, w, f"batch 2 layer {i}")
    first = got.per_layer[0][1]["position_embeddings"][0]
    assert got2.per_layer[0][1]["position_embeddings"][0] is first


def test_reader_keeps_at_most_a_window_of_the_shards_mapped(tmp_path):
    """Copying tensor by tensor, the mapped pages resident stay within the window (RssFile)."""
    from safetensors.torch import save_file

    def rss_file():
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:")), None)

    if rss_file() is None:
        pytest.skip("no RssFile in /proc/self/status")
    mb = 1 << 20
    save_file({f"t{i}": torch.full((mb // 4,), float(i)) for i in range(24)}, str(tmp_path / "model.safetensors"))
    growth = {}
    for window in (4 * mb, 1 << 40):
        reader = CheckpointReader(tmp_path, window_bytes=window, direct_io=False)
        keys = reader.file_order(reader.select(list(reader.weight_map)))
        start, peak, total = rss_file(), 0, 0.0
        for _, t in reader.tensors(keys, dtype=torch.float32):
            total += float(t.sum())  # touch every page
            peak = max(peak, rss_file() - start)
        assert total == sum(i * mb // 4 for i in range(24))
        growth[window] = peak
    assert growth[4 * mb] <= 4 * mb + 3 * mb
    assert growth[1 << 40] >= 16 * mb  # without the window the whole file stays mapped


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_model_equals_from_pretrained(checkpoint, dtype):
    """The whole model loaded tensor by tensor (lm_head and tied weights included, fp32-kept
    tensors in fp32) equals transformers' from_pretrained, bit for bit."""
    from superexperts.loading import load_model

    family, path = checkpoint
    want = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).state_dict()
    model, _ = load_model(path, dtype=dtype, device="cpu")
    got = model.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.base_model.get_input_embeddings().weight


def test_load_model_in_background_profiles_the_same(checkpoint, monkeypatch):
    """Layers read on the background thread and put in place by the first forward give the
    same stats as a model loaded up front; the reads happen on the background thread."""
    from superexperts.loading import load_model, load_model_in_background

    family, path = checkpoint
    ids = tokens(3, 16)
    upfront, _ = load_model(path, dtype="float32", device="cpu")
    want = superexperts.profile(upfront, ids, progress=False)
    threads = _reading_threads(monkeypatch)
    calls = []
    with load_model_in_background(path, dtype="float32", device="cpu") as (model, _):
        for i, layer in enumerate(decoder_layers(model)):
            layer.register_forward_pre_hook(lambda m, a, i=i: calls.append((i, a[0].shape[0])))
        got = superexperts.profile(model, ids, progress=False)
    same_stats(got, want)
    # While the layers were being read, every batch went through a layer before the next one.
    layers = len(decoder_layers(model))
    assert [i for i, _ in calls] == [i for i in range(layers) for _ in range(3)]
    layer_readers = {n for key, names in threads.items() if ".layers." in key for n in names}
    assert {n.split("_")[0] for n in layer_readers} == {"superexperts-read"}
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not [t for t in threading.enumerate() if t.name.startswith("superexperts-read")]


@pytest.mark.parametrize("batches_layer_major", [1, 2])
def test_background_profile_runs_the_batches_over_the_hidden_budget_batch_by_batch(batches_layer_major, monkeypatch, tmp_path):
    """Only the batches whose hidden states fit the budget run layer by layer; the rest (ragged
    last batch included) run batch by batch once the layers are in, with the same stats."""
    from superexperts import profiler
    from superexperts.loading import layers_loading, load_model, load_model_in_background

    path = _save("qwen3_moe", tmp_path / "ckpt")
    ids = tokens(5, 16)
    upfront, _ = load_model(path, dtype="float32", device="cpu")
    want = superexperts.profile(upfront, ids, batch_size=2, progress=False)
    hidden_size = upfront.config.hidden_size
    monkeypatch.setattr(profiler, "LAYER_MAJOR_HIDDEN_BYTES", batches_layer_major * 2 * 16 * hidden_size * 4)
    calls = []
    with load_model_in_background(path, dtype="float32", device="cpu") as (model, _):
        assert layers_loading(model)
        for i, layer in enumerate(decoder_layers(model)):
            layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        got = superexperts.profile(model, ids, batch_size=2, progress=False)
        assert not layers_loading(model)
    same_stats(got, want)
    layers = list(range(len(decoder_layers(model))))
    rest = 3 - batches_layer_major
    assert calls == [i for i in layers for _ in range(batches_layer_major)] + layers * rest


def test_leaving_background_loading_early_cancels_the_reads(checkpoint):
    from superexperts.loading import load_model_in_background

    family, path = checkpoint
    with pytest.raises(RuntimeError, match="before any forward"):
        with load_model_in_background(path, dtype="float32", device="cpu") as (model, _):
            raise RuntimeError("before any forward")
    assert not [t for t in threading.enumerate() if t.name.startswith("superexperts-read")]
    assert all(p.device.type == "meta" for layer in decoder_layers(model) for p in layer.parameters())
    assert not any(layer._forward_pre_hooks for layer in decoder_layers(model))


def test_other_quantizations_load_through_transformers(tmp_path, monkeypatch):
    """Checkpoints quantized otherwise than with FP8 block scales (e.g. MXFP4) are left to
    transformers' from_pretrained, which dequantizes them itself."""
    from superexperts import loading

    path = _save("qwen3_moe", tmp_path / "ckpt")
    calls = []
    real = loading._from_pretrained
    monkeypatch.setattr(loading, "_quantization", lambda config: "mxfp4")
    monkeypatch.setattr(loading, "_from_pretrained", lambda *a: calls.append(a) or real(*a))
    model, _ = loading.load_model(path, dtype="float32", device="cpu")
    with loading.load_model_in_background(path, dtype="float32", device="cpu") as (background, _):
        pass
    assert len(calls) == 2
    want = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) and torch.equal(background.state_dict()[k], v) for k, v in want.items())
    with pytest.raises(ValueError, match="quantization 'mxfp4' is not supported by layer streaming"):
        build_skeleton(path, dtype=torch.float32, device=CPU)


_EXPERT_KEY = re.compile(r"\.experts\.")


def _read_order(monkeypatch) -> list[tuple[str, object]]:
    """Record, in order, each checkpoint key read ("read", key) and each layer freed ("free", index)."""
    events: list[tuple[str, object]] = []
    real_tensors, real_free = CheckpointReader.tensors, LayerLoader.free_layer

    def tensors(self, keys, **kwargs):
        for key, tensor in real_tensors(self, keys, **kwargs):
            events.append(("read", key))
            yield key, tensor

    def free_layer(self, layer):
        real_free(self, layer)
        events.append(("free", next(i for i, l in enumerate(self.layers) if l is layer)))

    monkeypatch.setattr(CheckpointReader, "tensors", tensors)
    monkeypatch.setattr(LayerLoader, "free_layer", free_layer)
    return events


@pytest.mark.parametrize("hold_back", [1, 3000, 1 << 40])
def test_held_back_experts_are_read_after_the_layer_before_is_freed(checkpoint, monkeypatch, hold_back):
    """With `hold_back`, the last expert tensors of layer l (file order, the fewest that hold
    that many bytes) are read only once layer l-1 is freed, and the statistics are those of
    reading each layer whole when it is needed."""
    family, path = checkpoint
    ids = tokens(3, 16)
    want = stream_profile(path, ids, dtype="float32", progress=False, batch_size=2, prefetch=False)
    events = _read_order(monkeypatch)
    loaders = []
    real_prefetch = LayerLoader.prefetch

    def prefetch(self, *args, **kwargs):
        loaders.append(self)
        real_prefetch(self, *args, **kwargs)

    monkeypatch.setattr(LayerLoader, "prefetch", prefetch)
    memory = StreamStats()
    got = stream_profile(path, ids, dtype="float32", progress=False, batch_size=2, hold_back=hold_back, memory=memory)
    same_stats(got, want)
    assert memory.hold_back_bytes == hold_back

    reader = CheckpointReader(path)
    held_back = loaders[0].held_back
    per_expert = family in ("qwen3_moe", "mixtral", "deepseek_v3")  # every expert tensor copied into its place
    for index in range(1, len(loaders[0].layers)):
        tail = held_back.get(f"layer {index}", [])
        experts = reader.file_order([k for k in reader.layer_keys[index] if _EXPERT_KEY.search(k)])
        if per_expert and experts:
            assert tail == experts[-len(tail):]
        if not tail:
            continue
        freed = events.index(("free", index - 1))
        read_before = {k for kind, k in events[:freed] if kind == "read"}
        read_after = {k for kind, k in events[freed:] if kind == "read"}
        assert not read_before & set(tail) and set(tail) <= read_after
        sizes = [math.prod(reader.shape(k)) * 4 for k in tail]  # fp32
        assert sum(sizes) >= hold_back or not per_expert or len(tail) == len(experts)
        assert sum(sizes) - sizes[0] < hold_back
    assert held_back or not per_expert


def _layer_io(path, index):
    """(embeddings-to-layer hidden states, the layer's other arguments, the layer's output) of
    the full model for one batch."""
    full = transformers.AutoModelForCausalLM.from_pretrained(
        path, experts_implementation="superexperts", attn_implementation="superexperts_sink").eval()  # as the skeleton
    ids = tokens(1, 16)
    hidden, args = layer_arguments(full, ids)
    with torch.inference_mode():
        layers = decoder_layers(full)
        for i in range(index):
            out = layers[i](hidden, *args.per_layer[i][0], **args.per_layer[i][1])
            hidden = out[0] if isinstance(out, tuple) else out
        out = layers[index](hidden, *args.per_layer[index][0], **args.per_layer[index][1])
    return ids, hidden, args.per_layer[index], out[0] if isinstance(out, tuple) else out


def test_a_layer_whose_held_back_experts_wait_for_an_installed_layer_refuses_to_run(tmp_path):
    """Running a layer before freeing the one its held-back tensors wait for is an error, not a
    deadlock; once that layer is freed, the layer runs and gives the full model's output."""
    path = _save("qwen3_moe", tmp_path / "ckpt")
    ids, hidden, (args, kwargs), want = _layer_io(path, 1)
    model = build_skeleton(path, dtype=torch.float32, device=CPU)
    parts = find_layers(model)
    with LayerLoader(model, path, dtype=torch.float32, device=CPU) as loader:
        loader.load_base()
        first = loader.load_layer(0, parts[0])
        loader.prefetch(1, parts[1], hold_back=1)
        second = loader.load_layer(1, parts[1])
        with torch.inference_mode(), pytest.raises(RuntimeError, match=r"layer 1: its last 0 MB of expert tensors are read once the layers loaded before it are freed"):
            second(hidden, *args, **kwargs)
        loader.free_layer(first)
        with torch.inference_mode():
            out = second(hidden, *args, **kwargs)
        assert torch.equal(out[0] if isinstance(out, tuple) else out, want)
        assert loader.tail_wait_seconds["layer 1"] >= 0
        loader.free_layer(second)
    assert loader.held.now == 0


def test_freeing_a_layer_whose_held_back_experts_were_never_read(tmp_path):
    """A layer freed while its held-back tensors still wait: the wait ends, nothing leaks."""
    path = _save("qwen3_moe", tmp_path / "ckpt")
    model = build_skeleton(path, dtype=torch.float32, device=CPU)
    parts = find_layers(model)
    with LayerLoader(model, path, dtype=torch.float32, device=CPU) as loader:
        first = loader.load_layer(0, parts[0])
        loader.prefetch(1, parts[1], hold_back=1 << 40)
        second = loader.load_layer(1, parts[1])
        loader.free_layer(second)
        loader.free_layer(first)
        layer = loader.load_layer(1, parts[1])  # read again, whole
        full = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        want = decoder_layers(full)[1].state_dict()
        assert all(torch.equal(layer.state_dict()[k], w) for k, w in want.items())
        loader.free_layer(layer)
    assert loader.held.now == 0
    assert not [t for t in threading.enumerate() if t.name.startswith(("superexperts-read", "superexperts-reserve"))]


def test_error_reading_held_back_experts_is_raised_by_their_forward(checkpoint, monkeypatch):
    family, path = checkpoint
    reader = CheckpointReader(path)
    experts = reader.file_order([k for k in reader.layer_keys[2] if _EXPERT_KEY.search(k)])
    real = CheckpointReader.tensors

    def failing(self, keys, **kwargs):
        for key, tensor in real(self, keys, **kwargs):
            if key == experts[-1]:
                raise OSError("disk went away")
            yield key, tensor

    monkeypatch.setattr(CheckpointReader, "tensors", failing)
    with pytest.raises(LayerLoadError, match=rf"layer 2: reading {re.escape(experts[-1])} in \S+\.safetensors failed: OSError: disk went away"):
        stream_profile(path, tokens(2, 16), dtype="float32", progress=False, hold_back=1)


def test_reserved_buffers_are_filled_by_the_layers_read(checkpoint):
    """`reserve` allocates (and faults in) a layer's buffers ahead; its read fills exactly
    those, the layer equals from_pretrained's, and an unused reservation is released."""
    family, path = checkpoint
    full = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = build_skeleton(path, dtype=torch.float32, device=CPU)
    parts = find_layers(model)
    with LayerLoader(model, path, dtype=torch.float32, device=CPU) as loader:
        loader.prefetch(0, parts[0])
        loader.reserve(1, parts[1], hold_back=1)
        loader.reserve(2, parts[2])
        reserved = {t.data_ptr() for ts in loader._reserved["layer 1"].result().values() for t in ts}
        first = loader.load_layer(0, parts[0])
        loader.prefetch(1, parts[1], hold_back=1)
        loader.free_layer(first)
        second = loader.load_layer(1, parts[1])
        got = {t.data_ptr() for t in [*second.parameters(), *second.buffers()] if t.numel()}
        assert reserved and reserved <= got
        ids, hidden, (args, kwargs), want = _layer_io(path, 1)
        with torch.inference_mode():
            out = second(hidden, *args, **kwargs)
        assert torch.equal(out[0] if isinstance(out, tuple) else out, want)
        for name, w in decoder_layers(full)[1].state_dict().items():
            assert torch.equal(second.state_dict()[name], w), name
        loader.free_layer(second)
    assert loader.held.now == 0  # layer 2's reservation, never read, released by close


def test_negative_hold_back_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    path = _save("qwen3_moe", tmp_path / "ckpt")

    def no_skeleton(*args, **kwargs):
        raise AssertionError("built a skeleton for a refused run")

    monkeypatch.setattr("superexperts.streaming.build_skeleton", no_skeleton)
    with pytest.raises(ValueError, match=r"hold_back must be >= 0 bytes, got -1"):
        stream_profile(path, tokens(2, 16), dtype="float32", progress=False, hold_back=-1)
