"""Resumable sweeps refuse what they cannot continue exactly: another model, dtype or
checkpoint content, an incomplete checkpoint, a second writer; and clean up after a kill."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from tiny_models import build_model, plant, tokens

import superexperts
from superexperts.files import DirLock, LockedError
from superexperts.layers import find_layers
from superexperts.streaming import LayerLoader, stream_profile

OURS = dict(experts_implementation="superexperts", attn_implementation="superexperts_sink")


def same_stats(a, b):
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two Qwen3-MoE checkpoints of the same config and type, different weights."""
    superexperts.register()
    paths = []
    for seed in (0, 1):
        model = build_model("qwen3_moe", seed=seed)
        plant(model, 1, 3 + seed)
        path = tmp_path_factory.mktemp(f"qwen3_moe_{seed}")
        model.save_pretrained(path, max_shard_size="40KB")
        paths.append(path)
    return paths


def load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **OURS, **kwargs).eval()


def interrupted_in_memory(model, ids, checkpoint_dir, after_batches=2):
    calls = []

    def interrupt(module, inputs):
        calls.append(1)
        if len(calls) > after_batches:
            raise KeyboardInterrupt

    handle = model.base_model.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            superexperts.profile(model, ids, progress=False, checkpoint_dir=checkpoint_dir)
    finally:
        handle.remove()
    assert json.loads((checkpoint_dir / "state.0.json").read_text())["steps"][-1]["progress"] == after_batches


def interrupted_stream(path, ids, checkpoint_dir, monkeypatch, at_layer=2):
    real = LayerLoader.load_layer

    def fail(self, index, *args, **kwargs):
        if index == at_layer:
            raise KeyboardInterrupt
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(LayerLoader, "load_layer", fail)
    with pytest.raises(KeyboardInterrupt):
        stream_profile(path, ids, dtype="float32", progress=False, checkpoint_dir=checkpoint_dir)
    monkeypatch.setattr(LayerLoader, "load_layer", real)


def test_in_memory_resume_refuses_another_model_or_dtype(two_checkpoints, tmp_path):
    """Issue 9: the in-memory fingerprint held only model_type and num_layers, so another
    checkpoint of the same type, or another dtype, resumed and mixed two models' stats."""
    first, second = two_checkpoints
    ids = tokens(5, 12)
    interrupted_in_memory(load(first), ids, tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(.*weights"):
        superexperts.profile(load(second), ids, progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"other settings \(.*dtype"):
        superexperts.profile(load(first, dtype=torch.bfloat16), ids, progress=False, checkpoint_dir=tmp_path, resume=True)
    with torch.no_grad():  # the same model object, its weights changed after the interrupt
        changed = load(first)
        find_layers(changed)[2].experts.down_proj[5].mul_(2.0)
    with pytest.raises(ValueError, match=r"other settings \(.*weights"):
        superexperts.profile(changed, ids, progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"other settings \(.*batch_size"):
        superexperts.profile(load(first), ids, batch_size=2, progress=False, checkpoint_dir=tmp_path, resume=True)

    resumed = superexperts.profile(load(first), ids, progress=False, checkpoint_dir=tmp_path, resume=True)
    same_stats(resumed, superexperts.profile(load(first), ids, progress=False))


def test_streamed_resume_refuses_a_rewritten_checkpoint(two_checkpoints, tmp_path, monkeypatch):
    first, second = two_checkpoints
    model_dir = tmp_path / "model"
    load(first).save_pretrained(model_dir, max_shard_size="40KB")
    ids = tokens(3, 16)
    interrupted_stream(model_dir, ids, tmp_path / "ckpt", monkeypatch)
    load(second).save_pretrained(model_dir, max_shard_size="40KB")  # same path, other weights
    with pytest.raises(ValueError, match=r"other settings \(.*weights"):
        stream_profile(model_dir, ids, dtype="float32", progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    with pytest.raises(ValueError, match=r"other settings \(.*dtype"):
        stream_profile(model_dir, ids, dtype="bfloat16", progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)


@pytest.mark.parametrize("damage", ["delete_hidden", "truncate_stats", "flip_hidden_byte"])
def test_streamed_resume_refuses_an_incomplete_checkpoint(two_checkpoints, tmp_path, monkeypatch, damage):
    """Issue 9: with hidden.0.* deleted, a resume fed the later layers the embeddings."""
    path = two_checkpoints[0]
    ids = tokens(3, 16)
    interrupted_stream(path, ids, tmp_path, monkeypatch)
    hidden, stats = tmp_path / "hidden.0.2.safetensors", tmp_path / "stats.0.2.safetensors"
    if damage == "delete_hidden":
        hidden.unlink()
        message = "hidden.0.2.safetensors is missing"
    elif damage == "truncate_stats":
        stats.write_bytes(stats.read_bytes()[:-10])
        message = "stats.0.2.safetensors has .* bytes, not the"
    else:
        data = bytearray(hidden.read_bytes())
        data[-3] ^= 0xFF
        hidden.write_bytes(bytes(data))
        message = "hidden.0.2.safetensors does not match the SHA-256"
    with pytest.raises(ValueError, match=f"is incomplete: {message}"):
        stream_profile(path, ids, dtype="float32", progress=False, checkpoint_dir=tmp_path, resume=True)


def test_leftovers_are_removed_on_resume_and_other_ranks_files_kept(two_checkpoints, tmp_path, monkeypatch):
    path = two_checkpoints[0]
    ids = tokens(3, 16)
    uninterrupted = stream_profile(path, ids, dtype="float32", progress=False)
    interrupted_stream(path, ids, tmp_path, monkeypatch)
    state = json.loads((tmp_path / "state.0.json").read_text())
    assert [step["progress"] for step in state["steps"]] == [2]
    assert set(state["steps"][0]["files"]) == {"stats.0.2.safetensors", "hidden.0.2.safetensors"}
    # What a kill leaves: a half-written temporary file, the previous step's files, and a step
    # written after the last state update; another rank's files are not this rank's to touch.
    leftovers = [".hidden.0.3.safetensors.k2j4x.tmp", "hidden.0.1.safetensors", "stats.0.1.safetensors",
                 "stats.0.3.safetensors", ".state.0.json.a8f.tmp", ".tmpq8ntlD"]
    others = ["stats.1.2.safetensors", ".hidden.1.3.safetensors.zz.tmp", "notes.txt"]
    for name in leftovers + others:
        (tmp_path / name).write_bytes(b"x" * 1000)
    resumed = stream_profile(path, ids, dtype="float32", progress=False, checkpoint_dir=tmp_path, resume=True)
    same_stats(resumed, uninterrupted)
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == sorted(others + ["state.0.json", "stats.0.3.safetensors", "hidden.0.3.safetensors", "lock.0"])


def test_starting_over_a_checkpoint_without_resume_is_refused(two_checkpoints, tmp_path):
    model = load(two_checkpoints[0])
    ids = tokens(3, 12)
    interrupted_in_memory(model, ids, tmp_path)
    with pytest.raises(ValueError, match="holds a checkpoint of an earlier run .2 steps done.; pass --resume"):
        superexperts.profile(model, ids, progress=False, checkpoint_dir=tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"progress": 2}', "\xff\xfe"])
def test_garbage_state_file_is_a_clear_error(two_checkpoints, tmp_path, content):
    (tmp_path / "state.0.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match="state.0.json is not a checkpoint state this version can read"):
        superexperts.profile(load(two_checkpoints[0]), tokens(2, 8), progress=False, checkpoint_dir=tmp_path, resume=True)


def test_checkpoint_dir_that_is_a_file_is_refused(two_checkpoints, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="--checkpoint-dir .*file is a file"):
        superexperts.profile(load(two_checkpoints[0]), tokens(2, 8), progress=False, checkpoint_dir=target)


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from superexperts.files import DirLock
    lock = DirLock(sys.argv[1], "lock.0", "--checkpoint-dir").acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(two_checkpoints, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"is in use by process {holder.pid} on"):
            superexperts.profile(load(two_checkpoints[0]), tokens(2, 8), progress=False, checkpoint_dir=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # The lock file still names the killed process; the kernel dropped its lock.
    assert json.loads((tmp_path / "lock.0").read_text())["pid"] == holder.pid
    result = superexperts.profile(load(two_checkpoints[0]), tokens(2, 8), progress=False, checkpoint_dir=tmp_path)
    assert result.num_tokens == 16
    assert json.loads((tmp_path / "lock.0").read_text())["pid"] == os.getpid()
    DirLock(tmp_path, "lock.0", "x").acquire().release()  # released at the end of the run


class FakeRanks:
    """The other ranks of a distributed run, as `ProfileRun` sees them: a barrier, and the
    smallest step of all ranks (theirs is `others_step`)."""

    def __init__(self, others_step=0, fail_barrier_at=None):
        self.others_step, self.fail_barrier_at, self.barriers = others_step, fail_barrier_at, 0

    def barrier(self):
        self.barriers += 1
        if self.barriers == self.fail_barrier_at:
            raise KeyboardInterrupt  # killed after saving, before the others had saved

    def minimum(self, value):
        return min(value, self.others_step)


def test_ranks_killed_while_saving_resume_from_a_step_all_of_them_hold(tmp_path):
    """A rank keeps its previous step until every rank has saved the next one; on resume the
    ranks start from the last step they all hold."""
    from superexperts.sweep import ProfileRun

    ids = tokens(3, 8)

    def new_run(ranks):
        run = ProfileRun(ids, steps=3, num_sink_tokens=1, top_k_hidden=8, checkpoint_dir=tmp_path, ranks=ranks)
        return run

    run = new_run(FakeRanks(fail_barrier_at=2))
    run.start(torch.device("cpu"))
    with run.timed():
        run.stats.token_offset = 8
        run.step_done(1)
        run.stats.token_offset = 16
        with pytest.raises(KeyboardInterrupt):
            run.step_done(2)
    state = json.loads((tmp_path / "state.0.json").read_text())
    assert [step["progress"] for step in state["steps"]] == [1, 2]
    assert {f.name for f in tmp_path.glob("stats.*")} == {"stats.0.1.safetensors", "stats.0.2.safetensors"}

    for others, want_done, offset in ((1, 1, 8), (2, 2, 16), (0, 0, 0)):
        run = new_run(FakeRanks(others_step=others))
        run.start(torch.device("cpu"), resume=True)
        assert (run.done, run.stats.token_offset) == (want_done, offset)
        run.checkpoint.close()

    run = new_run(FakeRanks(others_step=1))
    run.start(torch.device("cpu"), resume=True)
    with run.timed():
        run.step_done(2)  # saved again, met the others, and the previous step dropped
    assert [step["progress"] for step in json.loads((tmp_path / "state.0.json").read_text())["steps"]] == [2]
    assert {f.name for f in tmp_path.glob("stats.*")} == {"stats.0.2.safetensors"}

    (tmp_path / "stats.0.2.safetensors").unlink()
    with pytest.raises(ValueError, match="holds steps .2., not step 1, the last one every rank finished"):
        new_run(FakeRanks(others_step=1)).start(torch.device("cpu"), resume=True)
