"""A gradient request trained by two processes (``accelerate launch``, gloo on CPU) gives the edit
one process gives on the same global batch, and only the main process writes the store."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from obliviate.engine import Store
from obliviate.engine.files import load_tensors
from obliviate.engine.processes import Processes
from obliviate.request import RegularizerSpec
from obliviate.training import TrainingSession
from obliviate.training.session import GradientConfig
from sd_tiny import build_tiny_sd

FAST = {"steps": "3", "forget_images": "4", "sampling_steps": "2", "batch_size": "4"}
# norm of the difference relative to the edit's; measured 1.0e-5 to 2.2e-5 (summing in another order)
TOLERANCE = 2e-4


def launch(processes: int, *arguments: str) -> subprocess.CompletedProcess:
    obliviate = Path(sys.executable).with_name("obliviate")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(obliviate), *arguments]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def edit(root: Path) -> dict[str, torch.Tensor]:
    return load_tensors(root / "edits" / "00001.safetensors")


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.mark.parametrize("model, targets, regularizers", [
    ("world", ["striped"], ()),
    ("world", ["striped"], (RegularizerSpec("l2sp", {"weight": "10"}),)),
    ("sd", ["a cat"], ()),
], ids=["world-esd", "world-esd-l2sp", "tiny-sd-esd"])
def test_two_processes_train_the_edit_one_process_trains(tmp_path, tiny_model_dir, tiny_sd_dir, model, targets, regularizers):
    one = Store.init(tmp_path / "one", tiny_model_dir if model == "world" else tiny_sd_dir)
    one.add_request(targets, "esd", FAST, regularizers=regularizers)
    shutil.copytree(one.root, tmp_path / "two")
    one.apply()

    result = launch(2, "apply", str(tmp_path / "two"))
    assert result.returncode == 0, result.stdout + result.stderr
    two = Store(tmp_path / "two")
    assert two.verify() == []
    applied = [e for e in two.ledger.events() if e.kind == "apply"]
    assert len(applied) == 1 and applied[0].payload["cost"]["processes"] == 2  # one writer, and it was a launch
    assert sorted(p.name for p in (two.root / "edits").iterdir()) == ["00001.safetensors"]

    alone, launched = edit(one.root), edit(two.root)
    assert alone.keys() == launched.keys()
    scale = torch.cat([d.flatten() for d in alone.values()]).norm()
    difference = torch.cat([(alone[k] - launched[k]).flatten() for k in alone]).norm()
    assert scale > 0 and difference <= TOLERANCE * scale, f"difference {difference:.3g} against edit norm {scale:.3g}"


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, tiny_model_dir):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    store.add_request(["striped"], "esd", {**FAST, "batch_size": "3"})
    before = store.ledger.head()
    result = launch(2, "apply", str(store.root))
    assert result.returncode != 0 and "batch_size 3 does not split over 2 processes" in result.stdout + result.stderr
    assert Store(store.root).ledger.head() == before and Store(store.root).verify() == []


def test_alone_this_is_the_main_process():
    alone = Processes()
    assert alone.is_main and alone.share([3, 1]) == [3, 1]
    alone.barrier()  # no process group: nothing to wait for


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_trains_on_its_share_of_the_batch_one_process_draws(tiny_t2i, processes):
    """Equal edits alone cannot tell data parallelism from every process training on the whole
    batch (DDP would average identical gradients); this checks the split itself."""
    def session(shard):
        s = TrainingSession(tiny_t2i, None, None, None, GradientConfig(batch_size=8), {}, np.random.default_rng(0),
                            torch.Generator().manual_seed(0), None, None, shard=shard)
        s.forget_latents = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        s.forget_prompts, s.anchor_prompts = [f"prompt {i}" for i in range(6)], [f"anchor {i}" for i in range(6)]
        return s

    whole = session((0, 1))
    expected = [whole.forget_batch() for _ in range(2)]
    for rank in range(processes):
        mine = session((rank, processes))
        rows = slice(rank * 8 // processes, (rank + 1) * 8 // processes)
        for full in expected:
            part = mine.forget_batch()
            assert part.prompts == full.prompts[rows] and part.anchors == full.anchors[rows]
            for name in ("clean", "noisy", "t", "noise"):
                assert torch.equal(getattr(part, name), getattr(full, name)[rows])
