"""Stable token references for the rows a vLLM step runs.

The engine packs the tokens of many requests into one step, in an order that changes
from step to step; statistics keep ``request_uid * span + position`` instead, where
``request_uid`` numbers the requests in the order this worker first ran them and
``span`` is the model's max length, so a reference reads back as
``(request, position in the request)``.

`TokenRefs.token_ref` ``[max_num_tokens]`` int64 is one persistent buffer: before each
model forward the runner hook (`install_runner_hook`) writes the step's references into
it from the runner's own per-token request index and positions, with -1 for padding rows
(CUDA-graph padding, ``is_padding``); after the forward it is set back to -1. Warm-up,
profiling and capture runs never pass through the hook, so they see only -1 and count
nothing. The experts read ``token_ref[:num_rows]`` on the device: no host sync.
"""

from __future__ import annotations

import functools

import torch

_refs: TokenRefs | None = None


class TokenRefs:
    def __init__(self, max_num_tokens: int, max_num_reqs: int, span: int, device: torch.device | str):
        self.span = span
        self.device = torch.device(device)
        self.token_ref = torch.full((max_num_tokens,), -1, dtype=torch.int64, device=device)
        self.row_uid = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)
        self.request_ids: list[str] = []
        self._uid: dict[str, int] = {}
        self._pinned = self.device.type == "cuda"
        self._active = 0  # rows written by the step in flight
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)  # profiled tokens

    def uid(self, request_id: str) -> int:
        uid = self._uid.get(request_id)
        if uid is None:
            uid = self._uid[request_id] = len(self.request_ids)
            self.request_ids.append(request_id)
        return uid

    def begin_step(self, n: int, req_ids: list[str], req_index: torch.Tensor, positions: torch.Tensor,
                   is_padding: torch.Tensor | None) -> None:
        """Fill the references of a step of `n` rows (padding included): req_ids (batch row
        -> request id), req_index ``[>= n]`` (row -> batch row), positions ``[>= n]`` (row ->
        position in its request), is_padding ``[n]`` bool or None."""
        uids = torch.tensor([self.uid(r) for r in req_ids], dtype=torch.int64)
        if self._pinned:
            uids = uids.pin_memory()  # the caching host allocator keeps it alive until copied
        self.row_uid[: len(req_ids)].copy_(uids, non_blocking=True)
        ref = self.row_uid[req_index[:n]] * self.span + positions[:n]
        if is_padding is not None:
            ref = torch.where(is_padding, -1, ref)
        self.token_ref[:n].copy_(ref)
        self.tokens.add_((ref >= 0).sum())
        self._active = n

    def end_step(self) -> None:
        self.token_ref[: self._active].fill_(-1)
        self._active = 0


    def tokens_profiled(self) -> int:
        return int(self.tokens)

    def reset_count(self) -> None:
        self.tokens.zero_()


def create(max_num_tokens: int, max_num_reqs: int, span: int, device) -> TokenRefs:
    """The worker's `TokenRefs` (made once; later calls return the same one)."""
    global _refs
    if _refs is None:
        _refs = TokenRefs(max_num_tokens, max_num_reqs, span, device)
    return _refs


def current() -> TokenRefs | None:
    return _refs


def install_runner_hook() -> None:
    """Wrap vLLM's V1 ``GPUModelRunner._model_forward`` (which the CPU runner inherits)
    so every real step fills `TokenRefs` first. Idempotent."""
    from vllm.forward_context import get_forward_context
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "_superexperts", False):
        return

    @functools.wraps(original)
    def _model_forward(self, *args, **kwargs):
        refs = _refs
        if refs is None:
            return original(self, *args, **kwargs)
        context = get_forward_context()
        num_reqs = self.input_batch.num_reqs
        refs.begin_step(
            kwargs["positions"].shape[-1] if context.is_padding is None else context.is_padding.shape[0],
            self.input_batch.req_ids[:num_reqs],
            self.req_indices.gpu,
            self.positions,
            context.is_padding,
        )
        try:
            return original(self, *args, **kwargs)
        finally:
            refs.end_step()

    _model_forward._superexperts = True
    GPUModelRunner._model_forward = _model_forward
