"""Smaller checkpoints (`superexperts prune`) and ignore lists for quantizers (`superexperts protect`)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import build_model, force_unrouted, tokens

import superexperts
from superexperts.cli import main
from superexperts.compress import PLAN_FILE, PrunePlan, plan_pruning, write_pruned
from superexperts.layers import find_layers
from superexperts.protect import protection, render

OURS = dict(experts_implementation="superexperts", attn_implementation="superexperts_sink")
EAGER = dict(experts_implementation="eager", attn_implementation="eager")


def _load(path, impl=EAGER):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **impl).eval()


def _source(tmp_path, family, **overrides):
    superexperts.register()
    model = build_model(family, **overrides)
    path = tmp_path / "src"
    model.save_pretrained(path)
    return model, path


def _mask_routers(model, plan):
    """The unpruned model's routers with the pruned experts' logits at -inf: softmax over the
    kept experts, top-k among them, renormalised as the family does (Qwen3-MoE when
    norm_topk_prob, Mixtral always). Returns the hook handles."""
    handles = []
    for p in find_layers(model):
        if not p.is_moe:
            continue
        gate = p.layer.get_submodule(p.experts_name.rpartition(".")[0]).gate
        pruned = torch.ones(plan.num_experts, dtype=torch.bool)
        pruned[plan.keep[p.index]] = False

        def hook(module, inputs, output, pruned=pruned):
            logits = output[0].masked_fill(pruned, float("-inf"))
            top, index = torch.topk(torch.softmax(logits.float(), dim=-1), module.top_k, dim=-1)
            if getattr(module, "norm_topk_prob", True):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), index

        handles.append(gate.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize(
    "family, overrides",
    [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}), ("mixtral", {})],
    ids=["qwen3_moe", "qwen3_moe_no_renorm", "mixtral"],
)
def test_pruned_checkpoint_is_the_model_with_pruned_router_logits_at_minus_inf(tmp_path, family, overrides):
    model, src = _source(tmp_path, family, **overrides)
    ids = tokens(3, 16, seed=1)
    result = superexperts.profile(_load(src, OURS), ids, progress=False)
    plan = plan_pruning(result, criterion="reap", keep_ratio=0.5)
    out = write_pruned(_load(src), plan, tmp_path / "small", source_dir=src)

    small = _load(out)
    config = json.loads((out / "config.json").read_text())
    assert config.get("num_experts", config.get("num_local_experts")) == plan.num_experts // 2
    assert json.loads((out / PLAN_FILE).read_text())["keep"] == {str(k): v for k, v in plan.keep.items()}
    for p in find_layers(small):
        original = find_layers(model)[p.index]
        if p.is_moe:
            assert p.experts.num_experts == plan.num_kept
            torch.testing.assert_close(p.experts.down_proj, original.experts.down_proj[plan.keep[p.index]], rtol=0, atol=0)

    reference = _load(src)
    handles = _mask_routers(reference, plan)
    check = tokens(2, 20, seed=2)
    with torch.no_grad():
        want = reference(check).logits
        for h in handles:
            h.remove()
        full = reference(check).logits
        got = small(check).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3), "pruning half the experts must change the outputs"


@pytest.mark.parametrize(
    "family, overrides, agree",
    [("qwen3_moe", {}, True), ("mixtral", {}, True), ("qwen3_moe", {"norm_topk_prob": False}, False)],
    ids=["qwen3_moe", "mixtral", "qwen3_moe_no_renorm"],
)
def test_equals_runtime_skip_only_when_no_token_chose_a_pruned_expert_and_weights_renormalise(
    tmp_path, family, overrides, agree
):
    """Prune exactly the experts no token reaches (a quarter of each layer, router logits about
    -2, so never in a top-k yet holding softmax mass): the runtime-skip model (router unchanged,
    pruned outputs dropped) then equals the smaller checkpoint when the family renormalises the
    top-k weights, and differs when it does not (without the pruned experts in the partition
    function the kept experts' softmax weights are larger)."""
    superexperts.register()
    model = build_model(family, **overrides)
    num_experts = find_layers(model)[0].experts.num_experts
    unrouted = {p.index: list(range(0, num_experts, 4)) for p in find_layers(model) if p.is_moe}
    force_unrouted(model, unrouted, weight=0.4)
    src = tmp_path / "src"
    model.save_pretrained(src)
    ids = tokens(4, 24, seed=3)
    result = superexperts.profile(_load(src, OURS), ids, progress=False)
    plan = plan_pruning(result, criterion="frequency", keep_ratio=0.75)
    assert all(sorted(set(range(num_experts)) - set(kept)) == unrouted[layer] for layer, kept in plan.keep.items())
    out = write_pruned(_load(src), plan, tmp_path / "small", source_dir=src)

    runtime = _load(src, OURS)
    with torch.no_grad(), superexperts.prune_experts(runtime, [(l, e) for l, ids_ in unrouted.items() for e in ids_]):
        skipped = runtime(ids).logits
    with torch.no_grad():
        small = _load(out)(ids).logits
    assert torch.allclose(small, skipped, rtol=1e-5, atol=1e-5) == agree


def test_super_experts_are_never_pruned_and_too_many_is_an_error(tmp_path):
    _, src = _source(tmp_path, "mixtral")
    result = superexperts.profile(_load(src, OURS), tokens(2, 16), progress=False)
    last = {layer: ranked[-1][0] for layer, ranked in result.importance("frequency").items()}
    protect = [{"layer_index": layer, "expert_index": e} for layer, e in last.items()] + [{"layer_index": 0, "expert_index": "shared"}]
    plan = plan_pruning(result, criterion="frequency", keep_ratio=0.25, protect=protect)
    assert all(last[layer] in kept and len(kept) == 2 for layer, kept in plan.keep.items())
    unprotected = plan_pruning(result, criterion="frequency", keep_ratio=0.25)
    assert all(last[layer] not in kept for layer, kept in unprotected.keep.items())
    with pytest.raises(ValueError, match="has 2 protected experts but keeps only 1"):
        plan_pruning(result, criterion="reap", keep_ratio=0.125, protect=[(0, 1), (0, 2)])
    with pytest.raises(ValueError, match="keep-ratio"):
        plan_pruning(result, criterion="reap", keep_ratio=0.0)
    with pytest.raises(ValueError, match="not a routed expert"):
        plan_pruning(result, criterion="reap", keep_ratio=0.5, protect=[(0, 99)])


def test_top_k_clamped_and_router_tensors_sliced(tmp_path):
    """DeepSeek-V3: router weight and e_score_correction_bias keep the kept rows; keeping fewer
    experts than top-k clamps top-k; group-limited routing that picks among groups is refused."""
    model, src = _source(tmp_path, "deepseek_v3", n_group=1, topk_group=1)
    result = superexperts.profile(_load(src, OURS), tokens(2, 16), progress=False)
    plan = plan_pruning(result, criterion="ean", keep_ratio=3 / 16)
    out = write_pruned(_load(src), plan, tmp_path / "small", source_dir=src)
    small = _load(out)
    assert small.config.num_experts_per_tok == 3 and small.config.n_routed_experts == 3
    for p in find_layers(small):
        if p.is_moe:
            keep = plan.keep[p.index]
            gate, original = p.layer.mlp.gate, find_layers(model)[p.index].layer.mlp.gate
            assert torch.equal(gate.weight, original.weight[keep])
            assert torch.equal(gate.e_score_correction_bias, original.e_score_correction_bias[keep])
    with torch.no_grad():
        assert torch.isfinite(small(tokens(1, 8)).logits).all()

    _, grouped = _source(tmp_path / "g", "deepseek_v3")  # n_group=4, topk_group=2
    grouped_result = superexperts.profile(_load(grouped, OURS), tokens(2, 16), progress=False)
    grouped_plan = plan_pruning(grouped_result, criterion="reap", keep_ratio=0.5)
    with pytest.raises(ValueError, match="group-limited routing"):
        write_pruned(_load(grouped), grouped_plan, tmp_path / "refused", source_dir=grouped)


def test_plan_must_match_the_model(tmp_path):
    _, src = _source(tmp_path, "qwen3_moe")
    plan = PrunePlan("reap", 0.5, 8, 4, {1: [0, 1, 2, 3]}, [])
    with pytest.raises(ValueError, match="no entry for MoE layer 0"):
        write_pruned(_load(src), plan, tmp_path / "x")


def test_prune_and_protect_cli(tmp_path, capsys):
    """profile -> prune --protect-super-experts -> the pruned checkpoint keeps the Super Expert
    and loads; protect writes per-tool patterns that name the expert's modules."""
    superexperts.register()
    model = build_model("qwen3_moe")
    ids = tokens(4, 16, seed=4)
    rows = superexperts.profile(model, ids, progress=False).routed[1].rows
    expert = int(torch.argsort(rows)[len(rows) // 2])  # a middling expert by frequency
    with torch.no_grad():
        find_layers(model)[1].experts.down_proj[expert].mul_(300.0)
    src = tmp_path / "src"
    model.save_pretrained(src)
    torch.save(ids, tmp_path / "calib.pt")
    report = tmp_path / "report"
    assert main(["profile", "--model", str(src), "--calib", str(tmp_path / "calib.pt"), "--seq-len", "16",
                 "--num-samples", "4", "--out", str(report), "--no-plots"]) == 0
    assert [(se["layer"], se["expert"]) for se in json.loads((report / "report.json").read_text())["super_experts"]] == [(1, expert)]

    out = tmp_path / "small"
    assert main(["prune", "--model", str(src), "--out", str(out), "--criterion", "frequency", "--keep-ratio", "0.25",
                 "--protect-super-experts", str(report / "report.json")]) == 0
    plan = json.loads((out / PLAN_FILE).read_text())
    assert expert in plan["keep"]["1"] and len(plan["keep"]["1"]) == 4
    with torch.no_grad():
        assert torch.isfinite(_load(out)(ids[:1]).logits).all()
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "no"), "--keep-ratio", "0.5"]) == 2
    assert "prune needs the importance sums" in capsys.readouterr().err

    assert main(["protect", "--report", str(report), "--format", "llmcompressor", "--out", str(tmp_path / "llmc.json")]) == 0
    llmc = json.loads((tmp_path / "llmc.json").read_text())
    assert llmc["ignore"] == [rf"re:^model\.layers\.1\.mlp\.experts\.{expert}\.(gate_proj|up_proj|down_proj)$"]
    assert llmc["ignore_whole_layers"] == [r"re:^model\.layers\.1\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"]
    assert "vLLM" in llmc["notes"][0]
    assert main(["protect", "--report", str(report / "Super Experts Report.json"), "--format", "modelopt"]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert main(["protect", "--report", str(report / "Super Experts Report.json"), "--format", "modelopt", "--model", str(src)]) == 0
    modelopt = json.loads(capsys.readouterr().out)
    assert set(modelopt["quant_cfg"]) == {
        f"*model.layers.1.mlp.experts.gate_up_proj_weight_quantizers.{expert}",
        f"*model.layers.1.mlp.experts.down_proj_weight_quantizers.{expert}",
    }
    assert modelopt["quant_cfg_whole_layers"] == {"*model.layers.1.mlp.experts.*": {"enable": False}}


def test_protect_patterns_match_the_modules_the_tools_create():
    """The patterns against the module and quantizer names each tool gives a transformers 5
    model: llm-compressor's per-expert Linear names, ModelOpt's per-expert weight quantizers and
    per-layer input quantizers, and the shared expert's own Linear modules (DeepSeek-V3)."""
    import fnmatch
    import re

    superexperts.register()
    model = build_model("deepseek_v3")
    from superexperts.protect import names_from_model

    names = names_from_model(model)
    spec = protection([(1, 5), (2, "shared")], names)
    linearized = [f"model.layers.{l}.mlp.experts.{e}.{p}" for l in (1, 2) for e in range(16) for p in ("gate_proj", "up_proj", "down_proj")]
    shared = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".shared_experts." in n]
    ignored = {n for n in linearized + shared for pat in spec["llmcompressor"]["ignore"] if re.match(pat[3:], n)}
    assert ignored == {f"model.layers.1.mlp.experts.5.{p}" for p in ("gate_proj", "up_proj", "down_proj")} | {
        n for n in shared if n.startswith("model.layers.2.")}
    quantizers = [f"model.layers.{l}.mlp.experts.{w}_weight_quantizers.{e}" for l in (1, 2) for e in range(16) for w in ("gate_up_proj", "down_proj")]
    quantizers += [f"model.layers.{l}.mlp.experts.{w}_input_quantizer" for l in (1, 2) for w in ("gate_up_proj", "down_proj")]
    quantizers += [f"{n}.{q}" for n in shared for q in ("weight_quantizer", "input_quantizer")]
    disabled = {q for q in quantizers for pat in spec["modelopt"]["quant_cfg"] if fnmatch.fnmatch(q, pat)}
    assert disabled == {f"model.layers.1.mlp.experts.{w}_weight_quantizers.5" for w in ("gate_up_proj", "down_proj")} | {
        q for q in quantizers if q.startswith("model.layers.2.mlp.shared_experts.")}
    whole = {q for q in quantizers for pat in spec["modelopt"]["quant_cfg_whole_layers"] if fnmatch.fnmatch(q, pat)}
    assert {q for q in whole if ".experts." in q} == {q for q in quantizers if q.startswith("model.layers.1.mlp.experts.")}
    assert render(spec, "llmcompressor")["super_experts"] == [[1, 5], [2, "shared"]]
    with pytest.raises(ValueError, match="no shared expert"):
        protection([(0, "shared")], names)  # layer 0 is dense


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_reproduce_paper_script_runs_end_to_end(tmp_path):
    """examples/reproduce_paper.sh on a tiny Qwen3-MoE with a planted expert and ready-made
    windows: every command of the paper sequence runs and the summary prints ours beside the
    paper's values."""
    from pathlib import Path

    superexperts.register()
    model = build_model("qwen3_moe")
    ids = tokens(4, 16, seed=6)
    rows = superexperts.profile(model, ids, progress=False).routed[1].rows
    expert = int(torch.argmax(rows))
    with torch.no_grad():
        find_layers(model)[1].experts.down_proj[expert].mul_(300.0)
    model.save_pretrained(tmp_path / "m")
    torch.save(ids, tmp_path / "windows.pt")
    script = Path(__file__).resolve().parents[1] / "examples" / "reproduce_paper.sh"
    env = {**os.environ, "SEQ_LEN": "16", "DTYPE": "float32", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(script), str(tmp_path / "m"), "qwen3-30b-a3b", str(tmp_path / "windows.pt"),
                          str(tmp_path / "out"), "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.stdout[run.stdout.index("\nSuper Experts\n"):]
    assert f"ours : (1,{expert});" in summary and "paper: (1,68) (2,92) (3,82)" in summary
    assert "with the Super Experts pruned" in summary and "paper: WikiText-2: 8.70 -> 59.86" in summary
    random_pruned = json.loads((tmp_path / "out" / "prune_random" / "ablation.json").read_text())["experts"]
    assert len(random_pruned) == 1 and random_pruned[0] != [1, expert]
