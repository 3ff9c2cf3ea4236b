"""Load a transformers MoE checkpoint directory for profiling, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .families import refusal_of, supported_model_types
from .layers import text_config

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(model_dir: str | Path):
    """Return the config of a checkpoint directory, or raise a clear error (also for a
    missing, truncated or corrupt safetensors shard: `check_shards`)."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"--model: {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {path} is not a transformers checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: {path / 'config.json'} cannot be read as a transformers config ({e})") from None
    check_shards(path)
    model_type = getattr(text_config(config), "model_type", None) or config.model_type
    supported = supported_model_types()
    if model_type not in supported and config.model_type not in supported:
        reason = refusal_of(config.model_type)
        if reason is not None:
            raise ValueError(f"--model: {reason}")
        raise ValueError(
            f"--model: unsupported architecture {config.model_type!r}: superexperts profiles MoE models whose experts "
            "transformers runs through its ExpertsInterface or that superexperts.adapters declares. Supported model "
            f"types (`superexperts families` lists them): {', '.join(supported)}"
        )
    return config


def check_shards(model_dir: Path) -> None:
    """Open the header of every safetensors shard of `model_dir` (those its index names, or
    all ``*.safetensors``): a missing, truncated or corrupt shard raises an error naming it
    before any weight is read."""
    from safetensors import SafetensorError, safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"--model: {index} is not a safetensors index ({e!r})") from None
    else:
        names = sorted(f.name for f in model_dir.glob("*.safetensors"))
    for name in names:
        shard = model_dir / name
        if not shard.is_file():
            raise FileNotFoundError(f"--model: shard {shard} named by {index.name} is missing")
        try:
            with safe_open(str(shard), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise ValueError(
                f"--model: {shard} is not a readable safetensors file ({e}); the checkpoint is truncated or corrupt: "
                "copy or download that shard again"
            ) from None


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda``, ``cuda:N``; a clear
    ValueError for anything else or for a CUDA device this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev


def load_model(model_dir: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """Load (model, tokenizer or None) from a checkpoint directory onto `device`, on our implementations."""
    from transformers import AutoModelForCausalLM

    from .integration import register

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_model_dir(model_dir)
    register()
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=DTYPES[dtype],
        experts_implementation="superexperts",
        attn_implementation="superexperts_sink",
    ).to(dev)
    model.eval()
    return model, load_tokenizer(model_dir)


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, or None when it has none (pre-tokenized data still works)."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")
    if not any((Path(model_dir) / f).is_file() for f in files):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        return None
