"""The CLI end to end on the built-in demo model, the reports it writes, and its errors."""

import json

import pytest
import torch

from superexperts.cli import main
from superexperts.demo import PLANTED, build_demo
from superexperts.result import ProfileResult


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), calibration_words=3000, eval_words=3000)


def test_demo_model_has_a_real_sink_made_by_its_planted_experts(demo):
    import superexperts
    from superexperts.calibration import load_calibration
    from superexperts.loading import load_model

    model, tok = load_model(demo.model_dir)
    calib = load_calibration(demo.calibration, tok, seq_len=64, num_samples=16)
    result = superexperts.profile(model, calib, batch_size=8, progress=False)
    assert [(s.layer, s.expert) for s in result.super_experts()] == [(layer, e) for layer, e, _, _ in PLANTED]
    assert [round(s.value) for s in result.super_experts()] == [744, 540, 430]
    massive = result.massive_activations()
    assert massive[3]["position"] == 0 and massive[3]["max"] > 1000
    sinks = result.sink_mass()
    assert all(float(sinks[layer].mean()) > 0.95 for layer in range(2, 6))

    evals = load_calibration(demo.eval, tok, seq_len=64, num_samples=8, seed=1)
    ablation = superexperts.ablate(model, result.super_experts(), evals, batch_size=8, progress=False)
    assert ablation.pruned.perplexity > 2 * ablation.base.perplexity
    assert all(ablation.sink_decay[layer] > 0.9 for layer in range(2, 6))
    random = superexperts.ablate(model, [(1, 5), (2, 6), (3, 7)], evals, batch_size=8, progress=False)
    assert random.pruned.perplexity == pytest.approx(random.base.perplexity, rel=0.01)
    assert all(abs(d) < 0.01 for d in random.sink_decay.values())


def test_profile_command_writes_reports(demo, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["profile", "--model", str(demo.model_dir), "--calib", str(demo.calibration),
               "--num-samples", "8", "--seq-len", "64", "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Super Experts" in printed and "744.00" in printed

    report = json.loads((out / "report.json").read_text())
    assert [(s["layer"], s["expert"]) for s in report["super_experts"]] == [(1, 68), (2, 92), (3, 82)]
    assert report["rule"]["name"] == "paper" and report["rule"]["layers"] == [0, 1, 2, 3]
    assert report["calibration"]["tokens"] == 8 * 64
    authors = json.loads((out / "Super Experts Report.json").read_text())
    assert authors[0] == {"expert_index": 68, "layer_index": 1, "output_max": 744.0, "rank": 1}
    for png in ("expert_heatmap.png", "massive_activations.png"):
        assert (out / png).stat().st_size > 1000
    reloaded = ProfileResult.load(out)
    assert [(s.layer, s.expert) for s in reloaded.super_experts()] == [(1, 68), (2, 92), (3, 82)]
    assert torch.equal(reloaded.routed[1].out_absmax, ProfileResult.load(out).routed[1].out_absmax)

    rc = main(["prune-eval", "--model", str(demo.model_dir), "--super-experts", str(out / "Super Experts Report.json"),
               "--eval", str(demo.eval), "--num-samples", "4", "--seq-len", "64", "--out", str(tmp_path / "ab")])
    assert rc == 0
    ablation = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    assert ablation["perplexity_after"] > ablation["perplexity_before"]
    assert ablation["sink_decay"]["2"] > 0.9
    assert (tmp_path / "ab" / "sink_decay.png").is_file()


def test_streamed_profile_command_equals_the_in_memory_one(demo, tmp_path):
    """`--stream`, with the default held-back tail, a small one and none: the same statistics,
    bit for bit, as the in-memory run."""
    common = ["--model", str(demo.model_dir), "--calib", str(demo.calibration), "--num-samples", "8", "--seq-len", "64",
              "--batch-size", "4", "--no-plots"]
    assert main(["profile", *common, "--out", str(tmp_path / "in_memory")]) == 0
    want = ProfileResult.load(tmp_path / "in_memory").tensors()
    for name, extra in (("default", []), ("small", ["--hold-back-mb", "0.01"]), ("none", ["--hold-back-mb", "0"])):
        assert main(["profile", *common, "--stream", *extra, "--out", str(tmp_path / name)]) == 0
        got = ProfileResult.load(tmp_path / name).tensors()
        assert set(got) == set(want)
        assert not [k for k in want if not torch.equal(got[k], want[k])], name


def test_prune_eval_with_explicit_experts(demo, capsys):
    rc = main(["prune-eval", "--model", str(demo.model_dir), "--experts", "1,68", "--eval", str(demo.eval),
               "--num-samples", "2", "--seq-len", "32"])
    assert rc == 0
    assert "perplexity:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["profile", "--model", "/nonexistent/model", "--calib", "x.txt"], "does not exist"),
        (["profile", "--model", "{model}", "--calib", "/nonexistent.txt"], "nonexistent.txt"),
        (["profile", "--model", "{model}", "--calib", "{calib}", "--seq-len", "4096"], "--seq-len"),
        (["profile", "--model", "{model}", "--calib", "{bad}"], "supported"),
        (["prune-eval", "--model", "{model}", "--experts", "1:68", "--eval", "{calib}"], "layer,expert"),
        (["prune-eval", "--model", "{model}", "--experts", "9,1", "--eval", "{calib}", "--num-samples", "1", "--seq-len", "8"], "layer 9"),
        (["profile", "--model", "{dense}", "--calib", "{calib}"], "unsupported architecture"),
    ],
)
def test_errors_are_clear(demo, tmp_path, capsys, args, message):
    import transformers

    dense = tmp_path / "dense"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                                          num_hidden_layers=1, num_attention_heads=2)).save_pretrained(dense)
    bad = tmp_path / "calib.xyz"
    bad.write_text("hello")
    fill = {"model": str(demo.model_dir), "calib": str(demo.calibration), "bad": str(bad), "dense": str(dense)}
    rc = main([a.format(**fill) for a in args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_demo_command(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity:" in printed and "D_sink" in printed
    assert (tmp_path / "report" / "sink_decay.png").is_file()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(s["layer"], s["expert"]) for s in report["super_experts"]] == [(1, 68), (2, 92), (3, 82)]
    assert report["ablation"]["perplexity_after"] > report["ablation"]["perplexity_before"]
