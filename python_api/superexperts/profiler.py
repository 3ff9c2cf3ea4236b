"""`profile(model, calibration)`: run calibration tokens and collect Super-Expert statistics.

The model runs on our experts implementation (``"superexperts"``) and sink attention
(``"superexperts_sink"``), switched on for the run and restored after it, so a model the
user loaded with any implementation works. Shared experts and dense MLPs are measured by
one forward hook on their ``down_proj``; massive activations by one hook per decoder
layer (`superexperts.integration`). All statistics stream into a `StatsCollector` on the
model's device.

A model still loading in the background (`superexperts.loading.load_model_in_background`) runs
its first batches layer by layer, so that computing a layer hides reading the next; the rest,
batch by batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .calibration import check_sink_tokens, check_token_ids
from .integration import as_batches, describe_model, hook_layer, moe_layers, our_implementations, run_batches
from .loading import layers_loading
from .result import ProfileResult
from .streaming import run_layer_major
from .sweep import ProfileRun, model_identity

# While a model's layers are still being read (`superexperts.loading.load_model_in_background`),
# the first batches run layer by layer, their hidden states held between layers up to this size.
LAYER_MAJOR_HIDDEN_BYTES = 1 << 29


def profile(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    *,
    batch_size: int = 1,
    num_sink_tokens: int = 1,
    top_k_hidden: int = 8,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
) -> ProfileResult:
    """Profile `model` on calibration tokens ``[num_sequences, seq_len]`` int64.

    Returns a `ProfileResult` with, per layer: routed/shared/dense down_proj output and
    input maxima with their locations and row counts, hidden-state massive activations,
    and the mean sink mass per head.

    With `checkpoint_dir`, the stats are saved every `checkpoint_every` batches (and at
    the end); `resume` continues from the last save, skipping the batches it covers. A resume
    is refused unless the model (its config, dtype and weights: `superexperts.sweep.model_identity`),
    the tokens and the settings are those of the saved run.
    """
    check_token_ids(calibration, model.get_input_embeddings().num_embeddings)
    check_sink_tokens(num_sink_tokens, calibration.shape[1])
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    parts = moe_layers(model)
    meta = describe_model(model, parts)
    run = ProfileRun(
        calibration,
        steps=len(as_batches(calibration, batch_size)),
        num_sink_tokens=num_sink_tokens,
        top_k_hidden=top_k_hidden,
        checkpoint_dir=checkpoint_dir,
        save_every=checkpoint_every,
        **(model_identity(model) if checkpoint_dir is not None else {}),
        model_type=meta["model_type"],
        num_layers=meta["num_layers"],
        streaming=False,
        batch_size=batch_size,
    )
    run.start(next(model.parameters()).device, resume)

    model.eval()
    handles = [h for p in parts for h in hook_layer(p, run.stats)]
    try:
        with run.timed(), our_implementations(model):
            done = run.done
            if done == 0 and layers_loading(model):
                done = run_layer_major(model, calibration, run.stats, batch_size=batch_size,
                                       max_hidden_bytes=LAYER_MAJOR_HIDDEN_BYTES, progress=progress)
                run.step_done(done)
            run_batches(model, calibration, run.stats, batch_size=batch_size, progress=progress,
                        skip_batches=done, on_batch_done=run.step_done)
    finally:
        for h in handles:
            h.remove()
    return run.result(**meta)
