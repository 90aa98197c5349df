import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from obliviate.models.train_t2i import T2IRecipe, _allowed_labels, train_t2i
from obliviate.world import DEFAULT_ONTOLOGY

from conftest import tiny_unet_config


def recipe(**overrides):
    base = dict(steps=4, batch_size=4, prompts_per_combination=1, checkpoint_every=2, warmup_steps=1, unet=tiny_unet_config())
    return T2IRecipe(**{**base, **overrides})


def test_oracle_data_never_shows_an_excluded_concept():
    onto = DEFAULT_ONTOLOGY
    labels = _allowed_labels(2000, 0, ("striped", "triangle"), onto)
    assert not (labels[:, 2] == onto.index("striped")).any() and not (labels[:, 0] == onto.index("triangle")).any()
    assert len(np.unique(labels[:, 2])) == len(onto.names("texture")) - 1
    with pytest.raises(ValueError, match="removes every concept"):
        _allowed_labels(10, 0, tuple(onto.names("colour")), onto)


def test_training_resumes_to_the_same_weights_as_an_unbroken_run(tmp_path):
    torch.set_num_threads(1)
    train_t2i(recipe(), tmp_path / "straight", device="cpu")
    train_t2i(recipe(steps=2), tmp_path / "broken", device="cpu")
    # same run folder, longer recipe: refused (the recipe is part of the run's identity)
    with pytest.raises(ValueError, match="different recipe"):
        train_t2i(recipe(), tmp_path / "broken", device="cpu")
    # a run killed after its step-2 checkpoint resumes from it
    (tmp_path / "resumed").mkdir()
    for name in ("checkpoint.safetensors", "train_state.json"):
        (tmp_path / "resumed" / name).write_bytes((tmp_path / "broken" / name).read_bytes())
    state = (tmp_path / "resumed" / "train_state.json").read_text().replace('"steps": 2', '"steps": 4')
    (tmp_path / "resumed" / "train_state.json").write_text(state)
    train_t2i(recipe(), tmp_path / "resumed", device="cpu")
    a = load_file(tmp_path / "straight" / "checkpoint.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
