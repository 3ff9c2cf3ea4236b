"""The command line on bad arguments, bad files and failing outputs: a clear message before
any model is loaded, never a traceback or a silent wrong answer; and non-finite findings
reported as such (issue 9)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tiny_models import VOCAB, build_model, plant, tokens

import superexperts
from superexperts import loading
from superexperts.cli import main
from superexperts.report import build_report
from superexperts.result import ProfileResult
from superexperts.rules import Rule


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint without a tokenizer (6 layers) and files around it."""
    root = tmp_path_factory.mktemp("cli_errors")
    superexperts.register()
    build_model("qwen3_moe", num_hidden_layers=6).save_pretrained(root / "model")
    np.save(root / "calib.npy", tokens(4, 16).numpy())
    (root / "a_file").write_text("x")
    (root / "empty.npy").write_bytes(b"")
    (root / "empty.pt").write_bytes(b"")
    (root / "empty.safetensors").write_bytes(b"")
    np.save(root / "big_ids.npy", np.full((4, 16), VOCAB + 104, dtype=np.int64))
    (root / "five.json").write_text("[5]")
    (root / "not_json.json").write_text("{nope")
    return root


@pytest.fixture
def no_model_load(monkeypatch):
    """Every path that loads or streams a model fails the test: errors must come first."""
    import superexperts.streaming

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(loading, "load_model", loaded)
    monkeypatch.setattr(superexperts.streaming, "stream_profile", loaded)


PROFILE = ["profile", "--model", "{model}", "--calib", "{calib}", "--seq-len", "16", "--num-samples", "4"]
PRUNE = ["prune-eval", "--model", "{model}", "--eval", "{calib}", "--seq-len", "16", "--num-samples", "2"]


@pytest.mark.parametrize(
    "args, message",
    [
        # item 7: outputs, checked before the model is loaded
        (PROFILE + ["--out", "{root}/a_file"], "--out {root}/a_file is a file; it must be a directory"),
        (PROFILE + ["--out", "{root}/a_file/sub"], "--out {root}/a_file/sub is under {root}/a_file, which is a file"),
        (PROFILE + ["--max-ratio", "0"], "max_ratio must be > 0"),
        (PRUNE + ["--experts", "1,2", "--out", "{root}/a_file/ab"], "--out {root}/a_file/ab is under"),
        # item 8: messages instead of tracebacks
        (["profile", "--model", "{model}", "--seq-len", "16", "--calib", "{root}/empty.npy"], "no tokens in {root}/empty.npy: the file is empty"),
        (["profile", "--model", "{model}", "--seq-len", "16", "--calib", "{root}/empty.pt"], "no tokens in {root}/empty.pt: the file is empty"),
        (["profile", "--model", "{model}", "--seq-len", "16", "--calib", "{root}/empty.safetensors"], "empty.safetensors: the file is empty"),
        (PROFILE + ["--stream", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (PROFILE + ["--device", "foo"], "--device 'foo': expected auto, cpu, cuda or cuda:N"),
        (PRUNE + ["--experts", "1,sharedfoo"], "cannot parse expert '1,sharedfoo'"),
        (PRUNE + ["--super-experts", "{root}/five.json"], "expert entry 5 is not a (layer, expert) pair"),
        (PRUNE + ["--super-experts", "{root}/not_json.json"], "not_json.json is not a JSON file"),
        (PROFILE + ["--checkpoint-dir", "{root}/a_file"], "--checkpoint-dir {root}/a_file is a file"),
        (["profile", "--model", "{model}", "--seq-len", "16", "--calib", "{root}/big_ids.npy", "--num-samples", "4"],
         "token id 200 is outside the model's vocabulary of 96"),
        # item 9: nonsense refused
        (PROFILE + ["--layers", "0-7"], "--layers: layers [6, 7] are outside the model's 6 decoder layers"),
        (PROFILE + ["--layers", "one"], "--layers 'one': expected layer indices"),
        (PROFILE + ["--rule", "std", "--k", "-2"], "k must be >= 0, got -2.0"),
        (PROFILE + ["--num-sink-tokens", "16"], "--num-sink-tokens 16 must be below --seq-len 16"),
        (PROFILE + ["--offload-hidden"], "--offload-hidden applies to layer streaming"),
        (PROFILE + ["--hold-back-mb", "64"], "--hold-back-mb applies to layer streaming"),
        (PROFILE + ["--stream", "--hold-back-mb", "-1"], "--hold-back-mb must be >= 0, got -1.0"),
        (PROFILE + ["--stream", "--hold-back-mb", "nan"], "--hold-back-mb must be >= 0, got nan"),
        (PROFILE + ["--dist-timeout", "60"], "--dist-timeout applies to --parallel runs"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(inputs, capsys, no_model_load, args, message):
    fill = {"model": str(inputs / "model"), "calib": str(inputs / "calib.npy"), "root": str(inputs)}
    rc = main([a.format(**fill) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message.format(**fill) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_shard_is_named(tmp_path, capsys, no_model_load, damage):
    model_dir = tmp_path / "model"
    build_model("qwen3_moe").save_pretrained(model_dir, max_shard_size="40KB")
    shard = sorted(model_dir.glob("model-*.safetensors"))[1]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage":
        shard.write_bytes(b"\x00" * 100)
    else:
        shard.unlink()
    np.save(tmp_path / "calib.npy", tokens(2, 16).numpy())
    rc = main(["profile", "--model", str(model_dir), "--calib", str(tmp_path / "calib.npy"), "--seq-len", "16"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(shard) in err and ("is missing" if damage == "missing" else "is not a readable safetensors file") in err


def test_api_token_checks(inputs):
    model = transformers.AutoModelForCausalLM.from_pretrained(inputs / "model").eval()
    with pytest.raises(ValueError, match=r"must be 2-D \[num_sequences, seq_len\], got shape \(16,\)"):
        superexperts.profile(model, tokens(2, 16)[0], progress=False)
    with pytest.raises(ValueError, match="must be integer token ids, got dtype torch.float32"):
        superexperts.profile(model, tokens(2, 16).float(), progress=False)
    with pytest.raises(ValueError, match="token id 100 is outside the model's vocabulary of 96"):
        superexperts.profile(model, tokens(2, 16) + 100 - tokens(2, 16).max(), progress=False)
    with pytest.raises(ValueError, match="--num-sink-tokens 4 must be below --seq-len 4"):
        superexperts.profile(model, tokens(2, 4), num_sink_tokens=4, progress=False)
    with pytest.raises(ValueError, match="need at least 2 tokens .a next-token loss., got seq_len 1"):
        superexperts.ablate(model, [(1, 2)], tokens(2, 1), progress=False)
    with pytest.raises(ValueError, match="layer 9 does not exist"):  # before the base evaluation
        superexperts.ablate(model, [(9, 2)], tokens(2, 8), progress=False)
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        superexperts.streaming.stream_profile(inputs / "model", tokens(2, 8), batch_size=0, progress=False)


def test_report_is_atomic_and_stats_are_kept_when_it_cannot_be_written(inputs, tmp_path, capsys, monkeypatch):
    """A full disk in the middle of report.json leaves the previous report whole and no
    temporary file; the error names where the stats were kept."""
    out = tmp_path / "out"
    args = ["profile", "--model", str(inputs / "model"), "--calib", str(inputs / "calib.npy"), "--seq-len", "16",
            "--num-samples", "4", "--out", str(out), "--no-plots"]
    assert main(args) == 0
    before = (out / "report.json").read_text()
    capsys.readouterr()

    real_write_text = type(out).write_text

    def disk_full(self, text, *a, **kw):
        if ".report.json." in self.name:
            real_write_text(self, text[: len(text) // 2], *a, **kw)
            raise OSError(28, "No space left on device")
        return real_write_text(self, text, *a, **kw)

    monkeypatch.setattr(type(out), "write_text", disk_full)
    assert main(args + ["--rule", "std"]) == 1
    err = capsys.readouterr().err
    assert f"could not write the report to {out}: [Errno 28] No space left on device" in err
    kept = err.split("the stats are kept in ")[1].split(": ")[0]
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert ProfileResult.load(kept).num_tokens == 64


def test_overflowed_expert_end_to_end_in_float16(tmp_path, capsys):
    """Issue 9: an expert whose output overflows fp16 printed '(none)' and exit 0. It is the
    first Super Expert, marked, and the report says it (JSON has no inf: the string)."""
    superexperts.register()
    model = build_model("qwen3_moe")
    plant(model, 1, 7, 1e6)
    model.save_pretrained(tmp_path / "model")
    np.save(tmp_path / "calib.npy", tokens(4, 16).numpy())
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="layer 1 expert 7"):
        rc = main(["profile", "--model", str(tmp_path / "model"), "--calib", str(tmp_path / "calib.npy"), "--seq-len", "16",
                   "--num-samples", "4", "--dtype", "float16", "--out", str(out), "--no-plots"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "(none)" not in printed and ("OVERFLOW" in printed or "NaN in the output" in printed)
    report = json.loads((out / "report.json").read_text())
    first = report["super_experts"][0]
    assert (first["layer"], first["expert"], first["rank"]) == (1, 7, 1)
    assert (first["status"], first["value"]) in (("overflow", "inf"), ("nan", "nan"))
    authors = json.loads((out / "Super Experts Report.json").read_text())
    assert authors[0]["layer_index"] == 1 and authors[0]["expert_index"] == 7
    assert not math.isfinite(float(authors[0]["output_max"]))
    # What follows an overflow: the next layers' hidden states are NaN, and say so.
    assert "nan" in [row["max"] for row in report["massive_activations"]]


def test_non_finite_numbers_in_the_report_are_strings_not_null(inputs):
    model = transformers.AutoModelForCausalLM.from_pretrained(inputs / "model").eval()
    result = superexperts.profile(model, tokens(2, 8), progress=False)
    for stats, name, index, value in ((result.sink[2], "mass_sum", 1, "nan"), (result.hidden[3], "top_values", 0, "nan"),
                                      (result.routed[0], "out_absmax", 4, "inf")):
        changed = getattr(stats, name).clone()
        changed[index] = float(value)
        setattr(stats, name, changed)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        report = build_report(result, Rule(), result.super_experts())
    text = json.dumps(report, allow_nan=False)
    assert "null" not in text.replace('"ablation": null', "")
    assert report["sink_mass"]["2"][1] == "nan" and report["massive_activations"][3]["max"] == "nan"
    assert report["super_experts"][0] == {"layer": 0, "expert": 4, "value": "inf", "rank": 1, "status": "overflow"}
    assert [float(x) for x in report["sink_mass"]["2"]][0] == pytest.approx(float(result.sink_mass()[2][0]))


def test_plots_of_a_profile_with_inf_and_nan_experts(inputs, tmp_path):
    """The heatmap's color scale comes from the finite values (an inf made matplotlib raise)."""
    pytest.importorskip("matplotlib")
    from superexperts.report import write_report

    model = transformers.AutoModelForCausalLM.from_pretrained(inputs / "model").eval()
    result = superexperts.profile(model, tokens(2, 8), progress=False)
    changed = result.routed[1].out_absmax.clone()
    seen = torch.nonzero(result.routed[1].rows > 0).flatten()
    changed[seen[0]], changed[seen[1]] = float("inf"), float("nan")
    result.routed[1].out_absmax = changed
    with pytest.warns(RuntimeWarning):
        paths = write_report(result, tmp_path)
    assert paths["heatmap"].stat().st_size > 1000 and paths["massive_activations"].stat().st_size > 1000


def test_ablation_results_are_kept_when_they_cannot_be_written(inputs, tmp_path, monkeypatch):
    from superexperts import report

    model = transformers.AutoModelForCausalLM.from_pretrained(inputs / "model").eval()
    ablation = superexperts.ablate(model, [(1, 2)], tokens(2, 8), progress=False)
    real = report.write_json_atomic

    def read_only(path, data):
        if path.parent == tmp_path / "ab":
            raise OSError(30, "Read-only file system")
        return real(path, data)

    monkeypatch.setattr(report, "write_json_atomic", read_only)
    with pytest.raises(report.ReportNotWritten, match=r"could not write ablation.json to .*/ab: \[Errno 30\]") as e:
        report.write_ablation(ablation, tmp_path / "ab", plots=False)
    kept = str(e.value).split("the results are kept in ")[1]
    assert json.loads((Path(kept) / "ablation.json").read_text())["experts"] == [[1, 2]]
