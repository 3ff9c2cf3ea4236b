"""Calibration and evaluation tokens for profiling MoE LLMs, packed into fixed-length windows.

`load_token_stream` reads a file into one 1-D int64 token stream, `pack_windows` cuts a
stream into non-overlapping ``[N, seq_len]`` windows, and `load_calibration` does both.

Inputs, chosen by path:

- ``.txt``: the whole file is one document (UTF-8).
- ``.jsonl``: one JSON object per line with the text under ``text_field``.
- ``.json``: a list of strings, or a list of objects with the text under ``text_field``.
- a directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict):
  its ``input_ids`` column when it has one, else its ``text_field`` column.
- ``.npy``, ``.pt`` (a tensor, or a dict holding one under ``"input_ids"``) and
  ``.safetensors`` (an ``input_ids`` tensor): pre-tokenized ids, 1-D or 2-D.

Text is tokenized without special tokens and documents are joined with the tokenizer's
EOS id when it has one. Pre-tokenized ids are used as they are: nothing is inserted
between rows or documents.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

_SUPPORTED = (
    ".txt, .jsonl, .json, .npy, .pt, .safetensors, "
    "or a directory written by datasets' save_to_disk"
)

# Text is read and tokenized in pieces of about this many characters, so that a large
# file is never held or tokenized as one string.
_CHUNK_CHARS = 1 << 20
# Documents handed to the tokenizer in one call, at most (fast tokenizers run a batch in
# parallel).
_BATCH_DOCS = 1024


def load_token_stream(
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    text_field: str = "text",
    split: str | None = None,
) -> torch.Tensor:
    """All tokens of a calibration file as one stream.

    Args:
        path: a file or ``datasets`` directory in one of the supported formats.
        tokenizer: a transformers tokenizer; needed for text inputs. With pre-tokenized
            inputs it is only used to check that the ids are inside its vocabulary.
        text_field: the key (``.jsonl``/``.json``) or column (datasets) holding the text.
        split: the split to read from a DatasetDict directory (default: ``"train"`` when
            it has one, else its first split); ignored for other inputs.

    Returns:
        ``[T]`` int64: documents joined with the tokenizer's EOS id when it has one;
        2-D pre-tokenized data row after row.
    """
    return _load_tokens(path, tokenizer, text_field=text_field, split=split).reshape(-1)


def pack_windows(
    stream: torch.Tensor,
    seq_len: int,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    bos_token_id: int | None = None,
    shuffle: bool = True,
) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows.

    Window ``i`` holds stream tokens ``[i * k, (i + 1) * k)`` with ``k = seq_len``, or, when
    `bos_token_id` is given, ``[bos_token_id]`` followed by those tokens with
    ``k = seq_len - 1``. The tail that does not fill a window is dropped.

    Args:
        stream: ``[T]`` integer token ids.
        seq_len: tokens per window.
        num_samples: how many windows to return; all of them, in stream order, when None.
        seed: seeds the random choice of windows; the same seed always gives the same
            windows, whatever the state of torch's global RNG.
        bos_token_id: prepended to every window when given.
        shuffle: choose the `num_samples` windows at random (without replacement) when
            True, else take the first ones.

    Returns:
        ``[N, seq_len]`` int64 with ``N = num_samples`` or the number of windows available.

    Raises:
        ValueError: the stream is too short for one window, or `num_samples` is more than
        the windows available.
    """
    if stream.dim() != 1 or not _is_integer(stream.dtype):
        raise ValueError(f"the token stream must be 1-D integer, got {tuple(stream.shape)} {stream.dtype}")
    step = seq_len - (bos_token_id is not None)
    if step < 1:
        raise ValueError(f"seq_len must be at least {2 if bos_token_id is not None else 1}, got {seq_len}")
    available = stream.numel() // step
    if available == 0:
        raise ValueError(
            f"the stream has {stream.numel()} tokens, too few for one window of {seq_len} "
            f"tokens; use a smaller --seq-len or more calibration data"
        )
    what = f"windows of {seq_len} tokens in {stream.numel()} tokens"
    rows = _choose(available, num_samples, seed, shuffle, what)
    windows = stream[: available * step].reshape(available, step)[rows].to(torch.int64)
    if bos_token_id is not None:
        bos = torch.full((windows.shape[0], 1), bos_token_id, dtype=torch.int64)
        windows = torch.cat([bos, windows], dim=1)
    return windows.contiguous()


def load_calibration(
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    seq_len: int,
    num_samples: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    add_bos: bool = True,
    max_seq_len: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Calibration windows from a file: `load_token_stream` then `pack_windows`.

    Every window starts with the tokenizer's BOS id when `add_bos` is set and a tokenizer
    with one is given (pre-tokenized files included); otherwise windows are plain stream
    slices. Pre-tokenized 2-D data whose rows are `seq_len` long is taken as the windows
    themselves, unchanged (no BOS added), with `num_samples` chosen among its rows.

    Args:
        path, tokenizer, text_field: as in `load_token_stream` (a DatasetDict is read
            from its default split).
        seq_len: tokens per window, at least 2.
        num_samples, seed: as in `pack_windows` (the choice is always seeded-random).
        add_bos: start every window with the tokenizer's BOS id, if it has one.
        max_seq_len: the model's ``max_position_embeddings``; `seq_len` may not exceed it.
        vocab_size: the model's vocabulary size; every id must be below it (checked even
            when there is no tokenizer to check pre-tokenized ids against).

    Returns:
        ``[N, seq_len]`` int64.
    """
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(
            f"--seq-len {seq_len} is above the model limit of {max_seq_len} tokens (max_position_embeddings)"
        )
    tokens = _load_tokens(path, tokenizer, text_field=text_field, split=None)
    if tokens.dim() == 2 and tokens.shape[1] == seq_len:
        rows = _choose(tokens.shape[0], num_samples, seed, True, f"rows of {seq_len} tokens in {path}")
        windows = tokens[rows].contiguous()
    else:
        bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
        windows = pack_windows(tokens.reshape(-1), seq_len, num_samples=num_samples, seed=seed, bos_token_id=bos)
    return check_token_ids(windows, vocab_size, str(path))


def check_sink_tokens(num_sink_tokens: int, seq_len: int) -> None:
    """The sink tokens are the first `num_sink_tokens` positions: at least one, and fewer
    than `seq_len` (with every key a sink, the sink mass is 1 by definition)."""
    if num_sink_tokens < 1:
        raise ValueError(f"--num-sink-tokens must be >= 1, got {num_sink_tokens}")
    if num_sink_tokens >= seq_len:
        raise ValueError(
            f"--num-sink-tokens {num_sink_tokens} must be below --seq-len {seq_len}: with every key a sink, "
            "the sink mass is 1 by definition"
        )


def check_token_ids(tokens: Any, vocab_size: int | None = None, what: str = "calibration tokens") -> torch.Tensor:
    """Return `tokens` if it is what a model takes: an integer tensor ``[num_sequences,
    seq_len]``, not empty, with ids in ``0 .. vocab_size - 1``; else raise a ValueError that
    names `what`."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of token ids [num_sequences, seq_len], got {type(tokens).__name__}")
    if not _is_integer(tokens.dtype):
        raise ValueError(f"{what} must be integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"{what} must be 2-D [num_sequences, seq_len], got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"{what} hold no token (shape {tuple(tokens.shape)})")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise ValueError(f"{what}: negative token id {low}")
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(f"{what}: token id {high} is outside the model's vocabulary of {vocab_size} (vocab_size)")
    return tokens


def _choose(
    available: int, num_samples: int | None, seed: int, shuffle: bool, what: str
) -> torch.Tensor | slice:
    """Which of `available` windows to keep: an index tensor ``[num_samples]`` or a slice."""
    if num_samples is None:
        return slice(None)
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples}")
    if num_samples > available:
        raise ValueError(
            f"--num-samples {num_samples} asks for more windows than there are: {available} {what}; "
            f"use --num-samples {available} or less, or a smaller --seq-len"
        )
    if not shuffle:
        return slice(num_samples)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=generator)[:num_samples]


def check_source(path: str | os.PathLike) -> str:
    """The kind of calibration source at `path`: ``"datasets"`` or its suffix (``".txt"``, ...).

    Raises what loading it would for a missing path or an unsupported format, without
    reading it: the CLI calls it before loading a model.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration data not found: {path}")
    if path.is_dir():
        if not _is_datasets_dir(path):
            raise ValueError(
                f"{path} is a directory but not one written by datasets' save_to_disk; supported: {_SUPPORTED}"
            )
        return "datasets"
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json", ".npy", ".pt", ".safetensors"):
        raise ValueError(f"unsupported calibration file {path}; supported: {_SUPPORTED}")
    return suffix


def _load_tokens(
    path: str | os.PathLike, tokenizer: Any, *, text_field: str, split: str | None
) -> torch.Tensor:
    """The tokens of `path`: ``[T]`` int64, or ``[N, L]`` int64 for 2-D pre-tokenized data."""
    kind = check_source(path)
    path = Path(path)
    if kind == "datasets":
        return _load_datasets_dir(path, tokenizer, text_field, split)
    if path.stat().st_size == 0:
        raise ValueError(f"no tokens in {path}: the file is empty (0 bytes)")
    try:
        return _load_file(path, kind, tokenizer, text_field)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x}: {e.reason}); if it is Latin-1 or "
            f"Windows-1252, convert it first, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}"
        ) from None


def _load_file(path: Path, kind: str, tokenizer: Any, text_field: str) -> torch.Tensor:
    if kind in (".txt", ".jsonl", ".json"):
        if tokenizer is None:
            raise ValueError(f"{path} holds text: pass a tokenizer to tokenize it")
        if kind == ".txt":
            return _tokenize(_read_txt(path), tokenizer, None, path)
        documents = _read_jsonl(path, text_field) if kind == ".jsonl" else _read_json(path, text_field)
        return _tokenize(documents, tokenizer, getattr(tokenizer, "eos_token_id", None), path)
    ids = {".npy": _read_npy, ".pt": _read_pt, ".safetensors": _read_safetensors}[kind](path)
    return _check_ids(ids, tokenizer, path)


def _read_txt(path: Path) -> Iterator[str]:
    """The file in pieces of about `_CHUNK_CHARS` characters, cut after a newline."""
    with open(path, encoding="utf-8") as f:
        rest = ""
        while block := f.read(_CHUNK_CHARS):
            block = rest + block
            cut = block.rfind("\n") + 1 or len(block)  # a line longer than a chunk is cut mid-line
            yield block[:cut]
            rest = block[cut:]
        if rest:
            yield rest


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            yield _text_of(record, text_field, f"{path}, line {lineno}")


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ValueError(
            f"{path}: expected a JSON list of strings or of objects, got {type(records).__name__}"
        )
    for i, record in enumerate(records):
        yield record if isinstance(record, str) else _text_of(record, text_field, f"{path}, item {i}")


def _text_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
        )
    if text_field not in record:
        raise ValueError(f"{where}: no {text_field!r} field (keys: {', '.join(map(str, record)) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _tokenize(documents: Iterable[str], tokenizer: Any, join: int | None, source: Path | str) -> torch.Tensor:
    """``[T]`` int64: the documents tokenized without special tokens, `join` between them."""
    pieces: list[np.ndarray] = []
    separator = np.array([join] if join is not None else [], dtype=np.int64)
    for batch in _batches(documents):
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in encoded["input_ids"]:
            if not ids:
                continue
            if pieces and separator.size:
                pieces.append(separator)
            pieces.append(np.asarray(ids, dtype=np.int64))
    if not pieces:
        raise ValueError(f"no tokens in {source}")
    return torch.from_numpy(np.concatenate(pieces))


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    """Lists of at most `_BATCH_DOCS` documents and about `_CHUNK_CHARS` characters."""
    batch: list[str] = []
    chars = 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if len(batch) == _BATCH_DOCS or chars >= _CHUNK_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


def _read_pt(path: Path) -> torch.Tensor:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a readable torch.save file of token ids ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        if "input_ids" not in data:
            keys = ", ".join(map(str, data)) or "none"
            raise ValueError(f"{path}: a dict without 'input_ids' (keys: {keys})")
        data = data["input_ids"]
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor or a dict with 'input_ids', got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if "input_ids" not in tensors:
        raise ValueError(f"{path}: no 'input_ids' tensor (tensors: {', '.join(tensors) or 'none'})")
    return tensors["input_ids"]


def _check_ids(ids: torch.Tensor, tokenizer: Any, source: Path | str) -> torch.Tensor:
    """Pre-tokenized ids as ``[T]`` or ``[N, L]`` int64, after checking dtype, shape and range."""
    if not _is_integer(ids.dtype):
        raise ValueError(f"{source}: token ids must be integers, got dtype {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{source}: token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"no tokens in {source}")
    ids = ids.to(torch.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise ValueError(f"{source}: negative token id {low}")
    if tokenizer is not None and high >= len(tokenizer):
        raise ValueError(
            f"{source}: token id {high} is outside the tokenizer's vocabulary of {len(tokenizer)}"
        )
    return ids.contiguous()


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _is_datasets_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _load_datasets_dir(path: Path, tokenizer: Any, text_field: str, split: str | None) -> torch.Tensor:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{path} was written by datasets' save_to_disk; reading it needs the datasets package: "
            "pip install datasets"
        ) from e
    dataset = datasets.load_from_disk(str(path))
    source = str(path)
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if split is None:
            split = "train" if "train" in dataset else splits[0]
        elif split not in dataset:
            raise ValueError(f"{path} has no split {split!r} (splits: {', '.join(splits)})")
        dataset = dataset[split]
        source = f"{path} [{split}]"
    if "input_ids" in dataset.column_names:
        rows = [np.asarray(ids, dtype=np.int64) for ids in _column(dataset, "input_ids")]
        if not rows:
            raise ValueError(f"no tokens in {source}")
        # Rows of one length stay 2-D, so that load_calibration can take them as windows.
        ids = np.stack(rows) if len({len(row) for row in rows}) == 1 else np.concatenate(rows)
        return _check_ids(torch.from_numpy(ids), tokenizer, source)
    if text_field not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise ValueError(f"{source}: no {text_field!r} or 'input_ids' column (columns: {columns})")
    if tokenizer is None:
        raise ValueError(f"{source} holds text: pass a tokenizer to tokenize it")
    return _tokenize(_column(dataset, text_field), tokenizer, getattr(tokenizer, "eos_token_id", None), source)


def _column(dataset: Any, name: str) -> Iterator[Any]:
    """The values of one column of a datasets.Dataset, read in batches."""
    for batch in dataset.select_columns([name]).iter(batch_size=_BATCH_DOCS):
        yield from batch[name]
