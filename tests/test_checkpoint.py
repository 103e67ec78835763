"""Checkpoints: atomic, durable files and a SHA-256 manifest written last, so that a crash at any
instant (SIGKILL, tested many times) leaves the latest checkpoint loadable and verified."""

import hashlib
import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from torch import nn

from apt_hal.models import ModelConfig, build_model
from apt_hal.models import checkpoint as ckpt
from apt_hal.models.train import TrainConfig, train


class TiedLM(nn.Module):
    """A small module with a tied weight and a buffer: what a checkpoint must carry."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("counts", torch.arange(5))


def _files(model, **extra):
    return {ckpt.MODEL_FILE: ckpt.model_weights_writer(model), ckpt.STATE_FILE: lambda p: torch.save({}, p),
            "notes.json": b'{"a": 1}', **extra}


def test_a_saved_checkpoint_loads_back_and_its_manifest_lists_every_file(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    state = {"step": 7, "moments": torch.randn(3, 4), "rng": ckpt.rng_state(torch.device("cpu"))}
    folder = ckpt.save_checkpoint(tmp_path, 7, _files(model, **{ckpt.STATE_FILE: lambda p: torch.save(state, p)}))
    assert folder == tmp_path / "step-00000007"

    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 7
    assert set(manifest["files"]) == {ckpt.MODEL_FILE, "notes.json", ckpt.STATE_FILE}
    assert {p.name for p in folder.iterdir()} == {*manifest["files"], ckpt.MANIFEST}, "no temporary file is left"
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert ckpt.verify_checkpoint(folder) == manifest

    torch.manual_seed(1)
    fresh = TiedLM()
    fresh.counts.zero_()
    ckpt.load_model_weights(fresh, folder)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.head.weight is fresh.embed.weight, "loading keeps the weights tied"
    loaded = ckpt.load_training_state(folder)
    assert loaded["step"] == 7 and torch.equal(loaded["moments"], state["moments"])
    with pytest.raises(ckpt.CheckpointError, match="do not fit this model"):
        ckpt.load_model_weights(nn.Linear(8, 8), folder)


def test_each_file_is_fsynced_before_its_rename_and_the_manifest_lands_last(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    folder = ckpt.save_checkpoint(tmp_path, 3, _files(TiedLM()))

    replaces = [e for e in events if e[0] == "replace"]
    assert [os.path.basename(e[2]) for e in replaces] == [ckpt.MODEL_FILE, ckpt.STATE_FILE, "notes.json", ckpt.MANIFEST]
    for _, tmp, final in replaces:
        at = events.index(("replace", tmp, final))
        assert os.path.dirname(tmp) == str(folder), "the temporary file is in the same folder (same filesystem)"
        assert ("fsync", tmp) in events[:at], f"{final} renamed before its data was fsynced"
        assert ("fsync", str(folder)) in events[at + 1:], f"the rename onto {final} was not made durable"
    assert ("fsync", str(tmp_path)) in events, "the new step folder's entry was not made durable"


def test_a_save_that_dies_midway_is_no_checkpoint_and_the_previous_one_is_latest(tmp_path):
    model = TiedLM()
    first = ckpt.save_checkpoint(tmp_path, 1, _files(model))

    def dies_midway(path):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, _files(model, **{"z_state.pt": dies_midway}))
    broken = tmp_path / "step-00000002"
    assert not (broken / ckpt.MANIFEST).exists() and not list(broken.glob(".*.tmp"))
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.verify_checkpoint(broken)
    assert ckpt.latest_checkpoint(tmp_path) == first
    # Saving step 2 again replaces the remains of the interrupted save.
    assert ckpt.save_checkpoint(tmp_path, 2, _files(model)) == broken
    assert ckpt.latest_checkpoint(tmp_path) == broken


def test_corruption_is_detected_and_latest_falls_back_to_an_intact_checkpoint(tmp_path):
    model = TiedLM()
    first = ckpt.save_checkpoint(tmp_path, 1, _files(model))
    second = ckpt.save_checkpoint(tmp_path, 2, _files(model))
    weights = second / ckpt.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.MODEL_FILE} is corrupt"):
        ckpt.verify_checkpoint(second)
    with pytest.warns(RuntimeWarning, match="skipping a damaged checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) == first

    (first / ckpt.MANIFEST).write_text('{"format": 1, "step": 1, "files": {')  # a torn manifest
    with pytest.raises(ckpt.CheckpointError, match="not a valid manifest"):
        ckpt.verify_checkpoint(first)
    (second / ckpt.MANIFEST).unlink()
    with pytest.warns(RuntimeWarning, match="not a valid manifest"):
        assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"), pytest.warns(RuntimeWarning):
        ckpt.resolve_checkpoint(tmp_path)


def _rewrite_manifest(folder, files):
    """Replace ``folder``'s manifest with one listing ``files`` (name -> path), hashed correctly."""
    entries = {name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}
               for name, path in files.items()}
    (folder / ckpt.MANIFEST).write_text(json.dumps({"format": 1, "step": 1, "files": entries}))


def test_a_manifest_must_list_the_weights_and_training_state_and_only_files_of_its_folder(tmp_path):
    folder = ckpt.save_checkpoint(tmp_path / "run", 1, _files(TiedLM()))
    own = {name: folder / name for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE)}
    outside = tmp_path / "hostname"
    outside.write_text("secret\n")
    (folder / "link").symlink_to(outside)
    cases = [({}, f"does not list {ckpt.MODEL_FILE}, {ckpt.STATE_FILE}"),
             ({ckpt.MODEL_FILE: own[ckpt.MODEL_FILE]}, f"does not list {ckpt.STATE_FILE}"),
             ({**own, "../../hostname": outside}, "lists '../../hostname', which is not a file of the checkpoint"),
             ({**own, str(outside): outside}, "which is not a file of the checkpoint folder"),
             ({**own, "link": outside}, "lists 'link', which is not a file of the checkpoint folder")]
    for files, message in cases:
        _rewrite_manifest(folder, files)
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.verify_checkpoint(folder)
    _rewrite_manifest(folder, own)
    assert ckpt.verify_checkpoint(folder)["files"].keys() == own.keys()
    with pytest.raises(ValueError, match=f"a checkpoint needs {ckpt.STATE_FILE}"):
        ckpt.save_checkpoint(tmp_path / "run", 2, {ckpt.MODEL_FILE: b"weights"})


def test_unreadable_weights_and_training_state_are_checkpoint_errors(tmp_path):
    folder = ckpt.save_checkpoint(tmp_path, 1, _files(TiedLM()))
    (folder / ckpt.MODEL_FILE).write_bytes(b"\x00not safetensors" * 8)
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.MODEL_FILE}: not a valid safetensors file"):
        ckpt.load_model_weights(TiedLM(), folder)
    for content in (b"torn", b"PK\x03\x04" + b"\x00" * 40):
        (folder / ckpt.STATE_FILE).write_bytes(content)
        with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.STATE_FILE}: unreadable training state"):
            ckpt.load_training_state(folder)
    torch.save([1, 2], folder / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match="the training state is a list, not a dict"):
        ckpt.load_training_state(folder)


def test_keep_last_removes_older_checkpoints_and_interrupted_saves(tmp_path):
    model = TiedLM()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, _files(model), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    (tmp_path / "step-00000000").mkdir()  # an interrupted save of an earlier step
    (tmp_path / "step-00000009").mkdir()  # of a later one: left for the save of step 9 to replace
    ckpt.save_checkpoint(tmp_path, 4, _files(model), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004", "step-00000009"]
    ckpt.save_checkpoint(tmp_path, 9, _files(model), keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000009"]


def test_resolve_and_save_refuse_what_they_cannot_do(tmp_path):
    model = TiedLM()
    folder = ckpt.save_checkpoint(tmp_path, 5, _files(model))
    assert ckpt.resolve_checkpoint(tmp_path) == folder == ckpt.resolve_checkpoint(folder)
    with pytest.raises(ckpt.CheckpointError, match="already holds a valid checkpoint"):
        ckpt.save_checkpoint(tmp_path, 5, _files(model))
    with pytest.raises(ckpt.CheckpointError, match="no such folder"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="file name 'manifest.json'"):
        ckpt.save_checkpoint(tmp_path, 6, {ckpt.MANIFEST: b"{}"})
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        ckpt.save_checkpoint(tmp_path, 6, _files(model), keep_last=0)


def test_the_random_state_round_trips(tmp_path):
    cpu = torch.device("cpu")
    state = ckpt.rng_state(cpu)
    expected = (random.random(), torch.rand(4))
    torch.save(state, tmp_path / "rng.pt")
    random.seed(123)
    torch.manual_seed(123)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), cpu)
    again = (random.random(), torch.rand(4))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])


# ---------------------------------------------------------------------------------------------
# SIGKILL during saves
# ---------------------------------------------------------------------------------------------

TRIALS = 30
VOCAB = 300
KILL_CONFIG = TrainConfig(steps=10 ** 6, batch_size=2, seq_len=16, save_every=1, keep_last=2, eval_every=10 ** 6,
                          log_every=10 ** 6, precision="fp32")


def _kill_test_model():
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("apt-dense-tiny", vocab_size=VOCAB))


def _train_until_killed(out: str, tokens: torch.Tensor) -> None:
    """The child process: resume from the latest checkpoint, if any, and save after every step."""
    torch.set_num_threads(1)  # a forked child must not use the OpenMP pool it inherited from the parent
    with open(os.devnull, "w") as quiet:
        train(_kill_test_model(), tokens[:-64], tokens[-64:], KILL_CONFIG, out,
              resume_from=ckpt.latest_checkpoint(out), stream=quiet)


def _wait_for_a_checkpoint_after(root, step: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(m.parent.name.split("-")[1]) > step for m in root.glob(f"step-*/{ckpt.MANIFEST}")):
            return
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint after step {step} appeared within {timeout} s")


def test_sigkill_at_random_moments_always_leaves_a_verified_loadable_latest_checkpoint(tmp_path):
    """One process per trial: it resumes where the last one was killed, as a preempted job would,
    saves after every step, and is killed with SIGKILL a random 0-100 ms after its first new
    checkpoint appears, so the kills land anywhere in the save / train cycle. Processes are forked
    from this one, which has torch imported already: a trial costs milliseconds of start-up. A
    forked child cannot use CUDA once this process has initialised it (earlier tests on a GPU
    machine); then they start from a fork server, which initialised nothing."""
    rng = random.Random(0)
    tokens = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
    fork = multiprocessing.get_context("forkserver" if torch.cuda.is_initialized() else "fork")
    latest_step, interrupted_saves = 0, 0
    for trial in range(TRIALS):
        child = fork.Process(target=_train_until_killed, args=(str(tmp_path), tokens))
        child.start()
        try:
            _wait_for_a_checkpoint_after(tmp_path, latest_step)
            time.sleep(rng.uniform(0.0, 0.1))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        assert child.exitcode == -signal.SIGKILL, f"trial {trial}: the child ended on its own ({child.exitcode})"

        found = ckpt.latest_checkpoint(tmp_path)  # verifies every SHA-256 of the manifest
        assert found is not None, f"trial {trial}: no checkpoint survived"
        step = ckpt.verify_checkpoint(found)["step"]
        assert step > latest_step, f"trial {trial}: the latest checkpoint is step {step}, not past {latest_step}"
        latest_step = step
        model = _kill_test_model()
        ckpt.load_model_weights(model, found)
        state = ckpt.load_training_state(found)
        assert state["step"] == step and state["optimizer"]["state"], trial
        incomplete = [p for p in tmp_path.iterdir() if not (p / ckpt.MANIFEST).exists()]
        interrupted_saves += bool(incomplete or list(tmp_path.glob("*/.*.tmp")))
    # The kills must really have landed inside saves, or the test proves nothing.
    assert interrupted_saves >= TRIALS // 4, f"only {interrupted_saves} of {TRIALS} kills interrupted a save"
