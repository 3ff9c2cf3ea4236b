"""``superexperts.vllm``: record Super-Expert statistics inside vLLM while it serves.

Offline::

    import superexperts.vllm as sev
    sev.enable()                       # before creating the LLM
    llm = LLM(model, enable_prefix_caching=False)
    llm.generate(prompts, params)
    result = sev.collect(llm)          # a superexperts.ProfileResult
    result.super_experts()
    sev.reset(llm)

``vllm serve``: ``SUPEREXPERTS_VLLM=1 VLLM_SERVER_DEV_MODE=1 vllm serve MODEL
--no-enable-prefix-caching``, then ``curl -X POST localhost:8000/collective_rpc -d
'{"method": "superexperts_dump", "args": ["/tmp/se_dump"]}'`` and
``superexperts vllm-report /tmp/se_dump --out report/``.

Nothing here imports vLLM until it is used.
"""

from .collect import collect, dump, load_dump, request_ids, reset, snapshots
from .plugin import ENV, enable, is_enabled, register

__all__ = ["ENV", "collect", "dump", "enable", "is_enabled", "load_dump", "register", "request_ids", "reset", "snapshots"]
