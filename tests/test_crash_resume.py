"""Crash-safe training state (issue #17): a `vsd train` process killed with SIGKILL at any
moment — between steps or in the middle of writing a checkpoint — leaves a complete
checkpoint behind, and the run resumed from the newest one ends with exactly the weights
of an uninterrupted run; SIGTERM saves before exiting; a fresh run refuses an output
directory that holds a drafter."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vsd_ext
from vsd_ext.durable import atomic_write
from vsd_ext.training.checkpoints import STATE, CheckpointStore, read_state
from vsd_ext.training.data import DataSplits

from helpers import random_dataset, write_tiny_target

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    target = write_tiny_target(root / "target")
    data = random_dataset(target, rows=24, seq_len=16, seed=1)
    path = root / "data.pt"
    DataSplits(data.rows(torch.arange(20)), data.rows(torch.arange(20, 24)),
               [row[:4] for row in data.input_ids[20:].tolist()], "crash").save(path)
    return root


def command(root: Path, out: Path, save_every: int = 1) -> list[str]:
    return [sys.executable, "-m", "vsd_ext", "train", "--target", str(root / "target"),
            "--out", str(out), "--data", str(root / "data.pt"), "--method", "eagle3",
            "--max-steps", str(STEPS), "--seq-len", "16", "--batch-size", "4", "--lr", "5e-3",
            "--warmup-steps", "2", "--save-every", str(save_every), "--no-progress",
            "--set", "eagle3.steps=2"]


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(cmd: list[str]) -> None:
    proc = start(cmd)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def weights(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


def newest_step(out: Path) -> int:
    latest = CheckpointStore(out).latest()
    if latest is None:
        return 0
    drafter_files = {p.name for p in latest.iterdir()}
    assert {STATE, "model.safetensors", "config.json"} <= drafter_files, latest
    return read_state(latest / STATE)["step"]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll `condition()` every millisecond until it holds (True) or the process ends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.001)
    return False


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The weights of an uninterrupted run (checkpoints do not change what is computed)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(command(setup, out, save_every=1000))
    return weights(out)


def test_sigkill_at_random_moments_resumes_exactly(setup, reference, tmp_path):
    root = setup
    out = tmp_path / "run"
    rng = random.Random(17)
    kills, during_save, last = 0, 0, 0
    for attempt in range(4):
        proc = start(command(root, out))
        step_now = newest_step(out) if out.exists() else 0
        if attempt % 2:  # during a save: as soon as a checkpoint is being written
            hit = wait_for(lambda: any(out.glob(".checkpoint-*.tmp")), proc)
            during_save += hit
        else:  # between saves: a random moment after some progress
            goal = step_now + rng.randrange(1, 6)
            wait_for(lambda: any(int(p.name.split("-")[1]) >= goal
                                 for p in out.glob("checkpoint-*")), proc)
            time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        step = newest_step(out)
        assert step >= last, "resume must never go back past a completed checkpoint"
        last = step
    assert kills >= 3 and during_save >= 1, (kills, during_save)
    assert last < STEPS, "the kills must land before the end of training"
    finish(command(root, out))
    resumed = weights(out)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    assert len(list(out.glob("checkpoint-*"))) == 1 and not list(out.glob(".checkpoint-*"))


def test_sigterm_saves_then_resumes_exactly(setup, reference, tmp_path):
    root = setup
    out = tmp_path / "run"
    proc = start(command(root, out, save_every=1000))
    assert wait_for(lambda: (out / "train_log.jsonl").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().count("\n") == 0 and "SIGTERM" in err and "resume" in err, err
    step = newest_step(out)
    assert 1 <= step < STEPS, step  # saved at the step it stopped, not by save_every
    finish(command(root, out, save_every=1000))
    resumed = weights(out)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    """A save that dies before its rename leaves the older checkpoint the newest complete
    one; a torn legacy `checkpoint/` or a stray temporary directory is never picked."""
    store = CheckpointStore(tmp_path)

    def write(directory):
        for name in (STATE, "model.safetensors", "config.json"):
            torch.save({"step": int(directory.name.split("-")[1].split(".")[0])},
                       str(directory / name))

    store.save(3, write)
    with pytest.raises(RuntimeError):
        store.save(4, lambda d: (write(d), (_ for _ in ()).throw(RuntimeError("killed"))))
    (tmp_path / "checkpoint").mkdir()  # older layout, torn: no model.safetensors
    torch.save({"step": 9}, str(tmp_path / "checkpoint" / STATE))
    assert store.latest() == tmp_path / "checkpoint-00000003"
    assert (tmp_path / ".checkpoint-00000004.tmp").is_dir()
    store.save(5, write)
    assert store.latest() == tmp_path / "checkpoint-00000005"
    assert not (tmp_path / "checkpoint-00000003").exists()
    assert not (tmp_path / ".checkpoint-00000004.tmp").exists()
    # A kill while an older checkpoint was being deleted leaves it half-removed: incomplete,
    # never picked, and removed by the next save.
    (tmp_path / "checkpoint-00000005" / "model.safetensors").unlink()
    assert store.latest() is None
    store.save(6, write)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000006"]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda tmp: (tmp.write_text("half"),
                                        (_ for _ in ()).throw(RuntimeError("killed"))))
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_fresh_run_refuses_an_existing_drafter(setup, tmp_path):
    root = setup
    target = vsd_ext.load_target(root / "target")
    occupied = tmp_path / "occupied"
    vsd_ext.Drafter.for_target(target).save_pretrained(occupied)
    before = (occupied / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a drafter"):
        vsd_ext.train_drafter(target, occupied, data=str(root / "data.pt"), seq_len=16,
                              batch_size=4, max_steps=1, progress=False)
    assert (occupied / "model.safetensors").read_bytes() == before
