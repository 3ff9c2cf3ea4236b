"""vLLM serves the checkpoint `superexperts prune` writes, and generates what transformers
generates from it (greedy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from vllm_env import requires_vllm

pytestmark = requires_vllm

SERVE = """
import sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=64, enforce_eager=True, max_num_seqs=2)
    prompts = [{"prompt_token_ids": p} for p in eval(sys.argv[2])]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0))
    print("TOKENS", [list(o.outputs[0].token_ids) for o in outs])
"""


def test_vllm_serves_the_pruned_checkpoint(tmp_path):
    import tiny_model
    import transformers

    import superexperts
    from superexperts.compress import PLAN_FILE, plan_pruning, write_pruned

    src = tmp_path / "src"
    tiny_model.build(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    result = superexperts.profile(model, torch.tensor(tiny_model.prompts(4, 16, seed=1)), progress=False)
    plan = plan_pruning(result, criterion="reap", keep_ratio=0.5, protect=[tiny_model.PLANTED])
    out = write_pruned(model, plan, tmp_path / "small", source_dir=src)
    assert tiny_model.PLANTED[1] in json.loads((out / PLAN_FILE).read_text())["keep"][str(tiny_model.PLANTED[0])]

    prompts = tiny_model.prompts(2, 6, seed=2)
    small = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = [small.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist() for p in prompts]
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("SUPEREXPERTS_VLLM", None)
    run = subprocess.run([sys.executable, str(script), str(out), repr(prompts)], capture_output=True, text=True,
                         timeout=600, env=env)
    line = next((line for line in run.stdout.splitlines() if line.startswith("TOKENS")), None)
    assert line is not None, run.stderr[-4000:]
    assert json.loads(line.split(" ", 1)[1]) == want
