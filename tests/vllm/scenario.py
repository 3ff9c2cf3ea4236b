"""One vLLM run for the tests, in its own process: ``python scenario.py MODE MODEL OUT``.

MODE: ``off`` (plain vLLM), ``eager`` or ``compiled`` (plugin enabled). Writes
``OUT/run.json`` (outputs, request ids, experts classes) and, with the plugin, one
`ProfileResult` directory per checkpoint of the statistics. The request batches are
`BATCHES` (name -> (num prompts, prompt length, seed, max_tokens)).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model below sends a function
sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCHES = {"a": (3, 20, 0, 1), "b": (2, 12, 1, 1), "c": (2, 9, 2, 1), "decode": (2, 8, 3, 4)}


def experts_classes(model) -> list[str]:
    names = set()
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            names.add(type(kernel.fused_experts).__name__)
    return sorted(names)


def main(mode: str, model: str, out: str) -> None:
    import scenario  # by module name, so the workers can unpickle its functions
    import tiny_model

    if mode != "off":
        import superexperts.vllm as sev

        sev.enable()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model, dtype="float32", max_model_len=tiny_model.MAX_LEN, max_num_seqs=8, seed=0,
              enforce_eager=mode != "compiled", enable_prefix_caching=False)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = {"mode": mode, "classes": llm.apply_model(scenario.experts_classes)[0],
           "compilation_mode": int(llm.llm_engine.vllm_config.compilation_config.mode), "batches": {}}

    def generate(name):
        num, length, seed, max_tokens = BATCHES[name]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in tiny_model.prompts(num, length, seed)]
        outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=3), use_tqdm=False)
        run["batches"][name] = [
            {"request_id": o.request_id, "tokens": list(o.outputs[0].token_ids),
             "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
            for o in outputs
        ]

    def checkpoint(name):
        sev.collect(llm).save(out_dir / name)
        run.setdefault("request_ids", {})[name] = sev.request_ids(llm)

    generate("a")
    if mode != "off":
        checkpoint("after_a")
        sev.reset(llm)
        checkpoint("after_reset")
    generate("b")
    if mode != "off":
        checkpoint("after_b")
    generate("c")
    if mode != "off":
        checkpoint("after_bc")
        sev.dump(llm, out_dir / "dump")
    generate("decode")
    (out_dir / "run.json").write_text(json.dumps(run, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
