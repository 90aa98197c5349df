import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from obliviate.models.judge import HELDOUT_SEED, JudgeRecipe, gaussian_blur, rotate_hue, train_judge
from obliviate.world import DEFAULT_ONTOLOGY, render, sample_scenes


def test_a_third_of_a_hue_turn_cycles_the_channels_and_keeps_greys():
    images = torch.rand(4, 3, 8, 8) * 0.5
    turned = rotate_hue(images, torch.full((4,), 2 * math.pi / 3))
    assert torch.allclose(turned, images[:, [2, 0, 1]], atol=1e-5)  # red becomes green, green blue, blue red
    grey = images.mean(1, keepdim=True).expand_as(images)
    assert torch.allclose(rotate_hue(grey, torch.rand(4) * 6), grey, atol=1e-5)
    assert torch.allclose(rotate_hue(images, torch.zeros(4)), images, atol=1e-6)


def test_blur_keeps_flat_images_spreads_a_point_symmetrically_and_zero_width_is_identity():
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 1.0])), flat, atol=1e-6)
    point = torch.zeros(2, 3, 9, 9)
    point[:, :, 4, 4] = 1
    blurred = gaussian_blur(point, torch.tensor([0.0, 1.0]))
    assert torch.allclose(blurred[0], point[0], atol=1e-6)
    assert blurred[1, 0, 4, 4] < 1 and torch.allclose(blurred[1], blurred[1].flip(-1).flip(-2), atol=1e-6)
    assert blurred[1].sum() == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize("bad, match", [({"fade": 1.5}, "fade"), ({"recolour": 1.0}, "recolour"), ({"blur": -1}, "blur")])
def test_judge_recipe_rejects_augmentations_out_of_range(bad, match):
    with pytest.raises(ValueError, match=match):
        JudgeRecipe(**bad)


def test_an_augmented_judge_trains_end_to_end():
    judge, card = train_judge(JudgeRecipe(steps=2, batch_size=8, fade=0.4, recolour=0.5, blur=0.8), log=lambda *_: None)
    assert set(card["heldout_render_accuracy"]) == {"shape", "colour", "texture"}
    assert card["recipe"]["fade"] == 0.4


def test_the_v2_judge_reads_a_faint_pattern_as_that_pattern():
    """What v2 is for: a texture drawn at half its contrast, as erased models draw the
    remains of a pattern, is still that texture (held-out renders)."""
    from obliviate.models.zoo import load_judge
    scenes = sample_scenes(256, HELDOUT_SEED + 1)
    solid = dataclasses.replace(scenes, texture=np.full(len(scenes), DEFAULT_ONTOLOGY.index("solid")))
    faint = torch.from_numpy(0.5 * render(scenes) + 0.5 * render(solid))
    patterned = scenes.texture != DEFAULT_ONTOLOGY.index("solid")
    called = load_judge("shapes-judge-v2").predict(faint)["texture"].numpy()
    assert (called[patterned] == scenes.texture[patterned]).mean() >= 0.95


def test_zoo_train_runs_each_judge_recipe_and_names_them_for_an_unknown_one(tmp_path):
    from typer.testing import CliRunner

    from obliviate.cli import app
    result = CliRunner().invoke(app, ["zoo", "train", "shapes-judge-v2", "--steps", "1", "--out", str(tmp_path / "j")])
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "j" / "judge.json").read_text())["recipe"]
    assert (recipe["steps"], recipe["fade"], recipe["recolour"], recipe["blur"]) == (1, 0.4, 0.5, 0.8)
    result = CliRunner().invoke(app, ["zoo", "train", "shapes-judge-v9"])
    assert result.exit_code != 0 and "shapes-judge-v2" in result.output
