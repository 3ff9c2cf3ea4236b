"""CheckpointReader: direct reads past the page cache equal the mapped shard's tensors."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import superexperts.checkpoint as checkpoint
from superexperts.checkpoint import CheckpointReader


def require_direct_reads(path) -> None:
    """Skip where files under `path` refuse O_DIRECT (tmpfs)."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    probe = path / "probe.bin"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{path}: the file system refuses O_DIRECT")
    finally:
        probe.unlink()


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    fp8 = (torch.randn(40, 24, generator=g) * 100).to(torch.float8_e4m3fn)
    return {
        "a.f32": torch.randn(37, 5, generator=g),  # sizes that leave later offsets unaligned
        "b.bf16": torch.randn(3, 1001, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(7, generator=g).half(),
        "d.i64": torch.arange(-5, 12),
        "e.bool": torch.rand(13, generator=g) > 0.5,
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.empty(0, 4),
        "h.nan": torch.tensor([float("nan"), float("inf"), -0.0, 1.0]),
        "i.big": torch.randn(64, 1024, generator=g),  # a window of its own
        "j.huge": torch.randn(200, 1024, generator=g),  # over the largest: from the mapping
        "k.u8": torch.randint(0, 255, (9999,), dtype=torch.uint8, generator=g),
        "layers.0.mlp.experts.gate_up_proj": torch.randn(6, 10, 8, generator=g),
        "l.weight": fp8,
        "l.weight_scale_inv": torch.rand(3, 2, generator=g) + 0.5,
    }


@pytest.fixture
def small_windows(monkeypatch):
    """Windows, reads and the largest direct tensor small enough for a small file."""
    monkeypatch.setattr(checkpoint, "DIRECT_CHUNK", 8192)
    monkeypatch.setattr(checkpoint, "DIRECT_WINDOW", 32768)
    monkeypatch.setattr(checkpoint, "DIRECT_LARGEST", 512 * 1024)
    monkeypatch.setattr(checkpoint, "DIRECT_GAP", 4096)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel():  # bit for bit (NaN included)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _read_all(path, keys, **kw) -> tuple[dict[str, torch.Tensor], CheckpointReader]:
    reader = CheckpointReader(path, **kw)
    got = {k: t.clone() for k, t in reader.tensors(keys, dtype=torch.float32)}
    return got, reader


@pytest.mark.parametrize("order", ["file", "shuffled"])
def test_direct_reads_equal_the_mapped_shard(tmp_path, small_windows, order):
    require_direct_reads(tmp_path)
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    keys = reader.file_order(reader.select(list(reader.weight_map)))
    if order == "shuffled":  # windows break where the next tensor is not the next in the file
        keys = keys[::2][::-1] + keys[1::2]
    want, _ = _read_all(tmp_path, keys, direct_io=False)
    got, direct = _read_all(tmp_path, keys)
    mapped = _tensors()["j.huge"].numel() * 4 + _tensors()["l.weight_scale_inv"].numel() * 4  # over the largest; scales
    assert direct.direct_bytes == direct.bytes_read - mapped
    assert direct.bytes_read == sum(t.numel() * t.element_size() for t in _tensors().values())
    for key in keys:
        _same(got[key], want[key])
    assert want["l.weight"].dtype == torch.float32  # dequantized with its scale


def test_direct_read_of_an_expert_range(tmp_path, small_windows):
    require_direct_reads(tmp_path)
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    key = ["layers.0.mlp.experts.gate_up_proj"]
    for rng in [(0, 6), (2, 5), (5, 6)]:
        reader = CheckpointReader(tmp_path)
        got = reader.read(key, dtype=torch.float32, expert_range=rng, num_experts=6)[key[0]]
        assert reader.direct_bytes == got.numel() * 4
        _same(got, _tensors()[key[0]][rng[0] : rng[1]])


def test_a_refused_direct_read_falls_back_to_the_mapping(tmp_path, small_windows, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the reads (EINVAL) is read mapped."""
    save_file(_tensors(), str(tmp_path / "model.safetensors"))

    def refuse(fd, array, offset):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(checkpoint, "_read_fully", refuse)
    reader = CheckpointReader(tmp_path)
    keys = reader.file_order(reader.select(list(reader.weight_map)))
    got, fell_back = _read_all(tmp_path, keys)
    assert fell_back.direct_bytes == 0 and fell_back.bytes_read > 0
    for key in keys:
        _same(got[key], _read_all(tmp_path, [key], direct_io=False)[0][key])


def test_direct_read_of_a_truncated_shard_names_it(tmp_path, small_windows):
    require_direct_reads(tmp_path)
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(1024), "b": torch.randn(4096)}, str(path))
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": path.name, "b": path.name}}))
    os.truncate(path, header + 4096 + 8192)
    reader = CheckpointReader(tmp_path)
    stream = reader.tensors(["a", "b"], dtype=torch.float32)
    with pytest.raises(OSError, match="model.safetensors: the file ends at byte"):
        for _ in stream:
            pass


def test_direct_io_off_by_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "DIRECT_IO", False)
    save_file({"a": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    assert not CheckpointReader(tmp_path).direct_io
