"""superexperts.calibration: every input format, window packing and every error path, offline."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from superexperts import calibration
from superexperts.calibration import load_calibration, load_token_stream, pack_windows

SENTENCES = [
    "Super experts are a handful of experts with extreme activation outliers.",
    "Pruning them collapses the model; pruning others barely matters.",
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts layers route every token to a few experts.",
]
BOS, EOS = 0, 1


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with ``<s>`` (0) as BOS and ``</s>`` (1) as EOS, trained here."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def joined(tokenizer, texts):
    """The expected stream of documents joined with EOS."""
    out = []
    for i, text in enumerate(texts):
        out += ([EOS] if i else []) + ids(tokenizer, text)
    return torch.tensor(out)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- input formats


def test_tokenizer_fixture(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)


def test_txt_is_one_document(tokenizer, tmp_path):
    text = "\n".join(SENTENCES) + "\n"
    path = tmp_path / "data.txt"
    path.write_text(text, encoding="utf-8")
    stream = load_token_stream(path, tokenizer)
    assert stream.dtype == torch.int64 and stream.dim() == 1
    assert torch.equal(stream, torch.tensor(ids(tokenizer, text)))
    assert EOS not in stream.tolist()


class RecordingTokenizer:
    """Calls a tokenizer and records the batches of text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.batches = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.batches.append(texts)
        return self.tokenizer(texts, **kwargs)


def test_txt_is_tokenized_in_chunks_cut_at_newlines(tokenizer, tmp_path, monkeypatch):
    text = "\n".join(SENTENCES * 5) + "\nü ends without a newline"
    path = tmp_path / "data.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(calibration, "_CHUNK_CHARS", 100)
    monkeypatch.setattr(calibration, "_BATCH_DOCS", 1)
    recording = RecordingTokenizer(tokenizer)
    stream = load_token_stream(path, recording)
    chunks = [batch[0] for batch in recording.batches]
    assert len(chunks) > 5 and all(len(c) < 200 and c.endswith("\n") for c in chunks[:-1])
    assert "".join(chunks) == text
    assert tokenizer.decode(stream) == text
    assert torch.equal(stream, torch.tensor(ids(tokenizer, text)))


def test_jsonl_documents_joined_with_eos(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"text": SENTENCES[0], "id": 1}) + "\n\n   \n" + json.dumps({"text": SENTENCES[1]}) + "\n"
    )
    assert torch.equal(load_token_stream(path, tokenizer), joined(tokenizer, SENTENCES[:2]))


def test_jsonl_custom_field_and_empty_documents(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"body": SENTENCES[2]}, {"body": ""}, {"body": SENTENCES[3]}])
    assert torch.equal(load_token_stream(path, tokenizer, text_field="body"), joined(tokenizer, SENTENCES[2:]))


def test_json_list_of_strings(tokenizer, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(SENTENCES))
    assert torch.equal(load_token_stream(path, tokenizer), joined(tokenizer, SENTENCES))


def test_json_list_of_objects(tokenizer, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"content": s} for s in SENTENCES]))
    assert torch.equal(load_token_stream(path, tokenizer, text_field="content"), joined(tokenizer, SENTENCES))


def test_tokenizer_without_eos_joins_directly(tokenizer, tmp_path):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(SENTENCES[:2]))
    expected = torch.tensor(ids(tokenizer, SENTENCES[0]) + ids(tokenizer, SENTENCES[1]))
    assert torch.equal(load_token_stream(path, no_eos), expected)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_npy_1d(tmp_path, dtype):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(100, dtype=dtype))
    stream = load_token_stream(path)
    assert stream.dtype == torch.int64 and torch.equal(stream, torch.arange(100))


def test_npy_2d_is_flattened(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(60, dtype=np.int32).reshape(6, 10))
    assert torch.equal(load_token_stream(path), torch.arange(60))
    # Rows of another length than seq_len are a stream too.
    windows = load_calibration(path, seq_len=8, num_samples=7, seed=3)
    assert windows.shape == (7, 8)
    assert sorted(windows[:, 0].tolist()) == sorted(set(windows[:, 0].tolist()))
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 8)) and w[0] % 8 == 0 for w in windows)


def test_npy_2d_rows_of_seq_len_are_the_windows(tokenizer, tmp_path):
    rows = np.arange(60, dtype=np.int64).reshape(6, 10) + 2
    path = tmp_path / "ids.npy"
    np.save(path, rows)
    # Used unchanged: no BOS even with a tokenizer that has one.
    assert torch.equal(load_calibration(path, tokenizer, seq_len=10), torch.from_numpy(rows))
    chosen = load_calibration(path, tokenizer, seq_len=10, num_samples=4, seed=1)
    assert chosen.shape == (4, 10) and chosen.dtype == torch.int64
    picked = [int((torch.from_numpy(rows) == row).all(1).nonzero()) for row in chosen]
    assert len(set(picked)) == 4
    assert torch.equal(chosen, load_calibration(path, tokenizer, seq_len=10, num_samples=4, seed=1))
    with pytest.raises(ValueError, match=r"6 rows of 10 tokens.*--num-samples 6 or less"):
        load_calibration(path, seq_len=10, num_samples=7)


def test_pt_tensor_and_dict(tmp_path):
    tensor_path, dict_path = tmp_path / "ids.pt", tmp_path / "dict.pt"
    torch.save(torch.arange(50, dtype=torch.int32), tensor_path)
    torch.save({"input_ids": torch.arange(50).view(5, 10), "attention_mask": torch.ones(5, 10)}, dict_path)
    assert torch.equal(load_token_stream(tensor_path), torch.arange(50))
    assert torch.equal(load_token_stream(dict_path), torch.arange(50))
    assert torch.equal(load_calibration(dict_path, seq_len=10), torch.arange(50).view(5, 10))


def test_safetensors(tmp_path):
    path = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.arange(40, dtype=torch.int32).view(4, 10)}, path)
    stream = load_token_stream(path)
    assert stream.dtype == torch.int64 and torch.equal(stream, torch.arange(40))
    assert torch.equal(load_calibration(path, seq_len=10, num_samples=4, seed=0).sort(0).values, stream.view(4, 10))


def test_pre_tokenized_gets_bos_only_from_a_tokenizer(tokenizer, tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(2, 42))
    assert torch.equal(load_calibration(path, seq_len=8), torch.arange(2, 42).view(5, 8))
    with_bos = load_calibration(path, tokenizer, seq_len=8)
    assert with_bos.shape == (5, 8) and (with_bos[:, 0] == BOS).all()
    assert torch.equal(with_bos[:, 1:], torch.arange(2, 37).view(5, 7))
    assert torch.equal(load_calibration(path, tokenizer, seq_len=8, add_bos=False), torch.arange(2, 42).view(5, 8))


def test_datasets_dir(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": SENTENCES}).save_to_disk(str(single))
    assert torch.equal(load_token_stream(single, tokenizer), joined(tokenizer, SENTENCES))

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"body": SENTENCES[:1]}),
            "train": datasets.Dataset.from_dict({"body": SENTENCES[1:3]}),
        }
    ).save_to_disk(str(splits))
    assert torch.equal(load_token_stream(splits, tokenizer, text_field="body"), joined(tokenizer, SENTENCES[1:3]))
    assert torch.equal(
        load_token_stream(splits, tokenizer, text_field="body", split="validation"), joined(tokenizer, SENTENCES[:1])
    )
    with pytest.raises(ValueError, match=r"no split 'test'.*validation, train"):
        load_token_stream(splits, tokenizer, text_field="body", split="test")
    with pytest.raises(ValueError, match=r"no 'text' or 'input_ids' column \(columns: body\)"):
        load_token_stream(splits, tokenizer)

    ragged = tmp_path / "ragged"
    datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "text": ["a", "b"]}).save_to_disk(str(ragged))
    assert torch.equal(load_token_stream(ragged), torch.tensor([5, 6, 7, 8, 9]))

    rows = tmp_path / "rows"
    datasets.Dataset.from_dict({"input_ids": torch.arange(40).view(4, 10).tolist()}).save_to_disk(str(rows))
    assert torch.equal(load_calibration(rows, seq_len=10), torch.arange(40).view(4, 10))


def test_datasets_dir_without_datasets_installed(tmp_path, monkeypatch):
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_token_stream(tmp_path)


# ---------------------------------------------------------------- packing


def test_windows_are_non_overlapping_slices():
    stream = torch.arange(1000, 1103)
    windows = pack_windows(stream, 10)
    assert windows.shape == (10, 10) and windows.dtype == torch.int64 and windows.is_contiguous()
    assert torch.equal(windows, stream[:100].view(10, 10))


def test_windows_with_bos():
    stream = torch.arange(10, 50, dtype=torch.int32)
    windows = pack_windows(stream, 5, bos_token_id=7)
    assert windows.shape == (10, 5) and windows.dtype == torch.int64
    assert (windows[:, 0] == 7).all()
    assert torch.equal(windows[:, 1:], stream.long().view(10, 4))


def test_seeded_choice_is_deterministic_and_distinct():
    stream = torch.arange(10_000)
    torch.manual_seed(123)
    a = pack_windows(stream, 16, num_samples=20, seed=5)
    torch.manual_seed(456)
    torch.rand(10)
    b = pack_windows(stream, 16, num_samples=20, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, pack_windows(stream, 16, num_samples=20, seed=6))
    # Each window is a whole, aligned slice of the stream, and none repeats.
    starts = a[:, 0]
    assert (starts % 16 == 0).all() and len(set(starts.tolist())) == 20
    assert torch.equal(a, torch.stack([stream[s : s + 16] for s in starts.tolist()]))
    assert not torch.equal(starts, starts.sort().values)


def test_seeded_choice_with_bos_keeps_slices():
    stream = torch.arange(1000)
    windows = pack_windows(stream, 9, num_samples=30, seed=2, bos_token_id=5000)
    assert (windows[:, 0] == 5000).all()
    starts = windows[:, 1].tolist()
    assert all(s % 8 == 0 for s in starts) and len(set(starts)) == 30
    assert torch.equal(windows[:, 1:], torch.stack([stream[s : s + 8] for s in starts]))


def test_without_shuffle_takes_the_first_windows():
    stream = torch.arange(100)
    assert torch.equal(pack_windows(stream, 10, num_samples=3, shuffle=False), stream[:30].view(3, 10))


def test_all_windows_available_can_be_asked_for():
    windows = pack_windows(torch.arange(100), 10, num_samples=10, seed=9)
    assert torch.equal(windows.sort(0).values, torch.arange(100).view(10, 10))


def test_load_calibration_end_to_end(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": s} for s in SENTENCES * 3])
    stream = load_token_stream(path, tokenizer)
    windows = load_calibration(path, tokenizer, seq_len=12, num_samples=5, seed=4, max_seq_len=12)
    assert torch.equal(windows, pack_windows(stream, 12, num_samples=5, seed=4, bos_token_id=BOS))
    plain = load_calibration(path, tokenizer, seq_len=12, add_bos=False)
    assert torch.equal(plain, stream[: stream.numel() // 12 * 12].view(-1, 12))


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_token_stream(path)


@pytest.mark.parametrize("name", ["data.csv", "data"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"supported: \.txt, \.jsonl, \.json, \.npy, \.pt, \.safetensors"):
        load_token_stream(path)


def test_plain_directory(tmp_path):
    with pytest.raises(ValueError, match="not one written by datasets"):
        load_token_stream(tmp_path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_text_without_tokenizer(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text("hello")
    with pytest.raises(ValueError, match="pass a tokenizer"):
        load_token_stream(path)


def test_jsonl_bad_line(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl, line 3: not valid JSON"):
        load_token_stream(path, tokenizer)


def test_jsonl_missing_field(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "fine"}, {"content": "x", "id": 2}])
    with pytest.raises(ValueError, match=r"line 2: no 'text' field \(keys: content, id\)"):
        load_token_stream(path, tokenizer)


@pytest.mark.parametrize("record", [["a list"], {"text": 3}])
def test_jsonl_wrong_types(tokenizer, tmp_path, record):
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    with pytest.raises(ValueError, match="line 1"):
        load_token_stream(path, tokenizer)


def test_json_bad_items(tokenizer, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(["fine", {"body": "x"}]))
    with pytest.raises(ValueError, match=r"item 1: no 'text' field \(keys: body\)"):
        load_token_stream(path, tokenizer)
    path.write_text(json.dumps({"text": "not a list"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_token_stream(path, tokenizer)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.json"])
def test_empty_text_files(tokenizer, tmp_path, name):
    path = tmp_path / name
    path.write_text("[]" if name.endswith(".json") else "")
    with pytest.raises(ValueError, match="no tokens"):
        load_token_stream(path, tokenizer)


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl", "latin1.json"])
def test_latin1_text_names_the_file_and_the_fix(tokenizer, tmp_path, name):
    """Issue 9: a UnicodeDecodeError without the file's name."""
    text = "caf\xe9 cr\xe8me br\xfbl\xe9e"
    content = {".txt": text, ".jsonl": json.dumps({"text": text}, ensure_ascii=False),
               ".json": json.dumps([text], ensure_ascii=False)}[Path(name).suffix]
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(byte 0xe9.*iconv -f latin1 -t utf-8"):
        load_token_stream(path, tokenizer)


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_unreadable_pre_tokenized_files_are_named(tmp_path, suffix):
    path = tmp_path / f"ids{suffix}"
    path.write_bytes(b"\x93NUMPY garbage" * 3)
    with pytest.raises(ValueError, match=rf"ids\{suffix}: not a readable"):
        load_token_stream(path)


def test_empty_pre_tokenized(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="no tokens"):
        load_token_stream(path)


def test_float_npy(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(10, dtype=np.float32))
    with pytest.raises(ValueError, match="must be integers.*float32"):
        load_token_stream(path)


def test_float_pt_and_bad_shapes(tmp_path):
    path = tmp_path / "ids.pt"
    torch.save(torch.ones(10, dtype=torch.bfloat16), path)
    with pytest.raises(ValueError, match="must be integers"):
        load_token_stream(path)
    torch.save(torch.zeros(2, 2, 2, dtype=torch.int64), path)
    with pytest.raises(ValueError, match=r"1-D or 2-D, got shape \(2, 2, 2\)"):
        load_token_stream(path)
    torch.save({"ids": torch.zeros(4, dtype=torch.int64)}, path)
    with pytest.raises(ValueError, match=r"without 'input_ids' \(keys: ids\)"):
        load_token_stream(path)


def test_safetensors_without_input_ids(tmp_path):
    path = tmp_path / "ids.safetensors"
    save_file({"tokens": torch.zeros(4, dtype=torch.int64)}, path)
    with pytest.raises(ValueError, match=r"no 'input_ids' tensor \(tensors: tokens\)"):
        load_token_stream(path)


def test_negative_ids(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([3, 4, -1, 5]))
    with pytest.raises(ValueError, match="negative token id -1"):
        load_token_stream(path)


def test_ids_outside_the_vocabulary(tokenizer, tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([3, len(tokenizer)]))
    assert load_token_stream(path).numel() == 2
    with pytest.raises(ValueError, match=f"token id {len(tokenizer)} is outside"):
        load_token_stream(path, tokenizer)


def test_stream_too_short():
    with pytest.raises(ValueError, match=r"7 tokens, too few for one window of 8 tokens.*--seq-len"):
        pack_windows(torch.arange(7), 8)
    with pytest.raises(ValueError, match="too few"):
        pack_windows(torch.arange(7), 9, bos_token_id=0)
    assert pack_windows(torch.arange(7), 8, bos_token_id=0).shape == (1, 8)


def test_too_many_samples():
    with pytest.raises(ValueError, match=r"10 windows of 10 tokens.*--num-samples 10 or less.*--seq-len"):
        pack_windows(torch.arange(105), 10, num_samples=11)
    with pytest.raises(ValueError, match="--num-samples must be at least 1"):
        pack_windows(torch.arange(105), 10, num_samples=0)


def test_bad_stream():
    with pytest.raises(ValueError, match="1-D integer"):
        pack_windows(torch.arange(20).view(4, 5), 5)
    with pytest.raises(ValueError, match="1-D integer"):
        pack_windows(torch.ones(20), 5)
    with pytest.raises(ValueError, match="at least 2"):
        pack_windows(torch.arange(20), 1, bos_token_id=0)


def test_seq_len_above_model_limit(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(100))
    with pytest.raises(ValueError, match=r"--seq-len 64 is above the model limit of 32"):
        load_calibration(path, seq_len=64, max_seq_len=32)
    assert load_calibration(path, seq_len=32, max_seq_len=32).shape == (3, 32)


@pytest.mark.parametrize("seq_len", [1, 0, -4])
def test_seq_len_below_two(tmp_path, seq_len):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(100))
    with pytest.raises(ValueError, match="--seq-len must be at least 2"):
        load_calibration(path, seq_len=seq_len)
