import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from obliviate.world import (DEFAULT_ONTOLOGY, HELDOUT_TEMPLATES, SPLITS, TRAIN_TEMPLATES, Concept, Ontology,
                             prompt_for, render, sample_scenes, training_prompts)

ONTO = DEFAULT_ONTOLOGY


def test_ontology_meets_the_world_spec():
    assert len(ONTO.in_domain("shape")) >= 8 and len({c.parent for c in ONTO.in_domain("shape")}) >= 3
    assert len(ONTO.in_domain("colour")) >= 8 and len({c.parent for c in ONTO.in_domain("colour")}) >= 2
    assert len(ONTO.in_domain("texture")) >= 5
    for name in ("triangle", "square", "circle", "star", "red", "green", "blue", "yellow",
                 "solid", "striped", "dotted", "checkered"):
        ONTO.get(name)
    assert len(TRAIN_TEMPLATES) >= 6 and len(HELDOUT_TEMPLATES) >= 3
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    for c in ONTO.concepts:
        assert len(c.train_synonyms) + len(c.heldout_synonyms) >= 2 and c.heldout_synonyms


def test_no_word_names_two_concepts():
    words = [w for c in ONTO.concepts for w in c.words]
    assert len(words) == len(set(words))
    with pytest.raises(ValueError, match="names both"):
        Ontology(ONTO.concepts + (Concept("crimsonish", "colour", "warm", ("scarlet",), ("x",)),))


def test_every_concept_is_reachable_by_prompts():
    rng = np.random.default_rng(0)
    labels = np.array([[i % 9, i % 8, i % 5] for i in range(360)])
    prompts = training_prompts(labels, rng)
    for c in ONTO.concepts:
        trained = (c.name, *c.train_synonyms)
        assert any(any(w in p for w in trained) for p in prompts), c.name
    for split in SPLITS:
        for c in ONTO.concepts:
            index = ONTO.index(c.name)
            row = [0, 0, 0]
            row[ONTO.domains.index(c.domain)] = index
            prompt = prompt_for(tuple(row), split)
            words = c.heldout_synonyms if split == "heldout_synonym" else (c.name,)
            assert any(w in prompt for w in words), (split, c.name, prompt)


def test_heldout_synonyms_never_appear_in_training_prompts():
    rng = np.random.default_rng(1)
    labels = np.array([[i % 9, i % 8, i % 5] for i in range(720)])
    text = " | ".join(training_prompts(labels, rng))
    for c in ONTO.concepts:
        for w in c.heldout_synonyms:
            assert f" {w} " not in f" {text} ".replace(",", " "), w


def test_unknown_concept_suggests_near_names():
    with pytest.raises(ValueError, match="Did you mean: .*striped"):
        ONTO.resolve("stripped")


def test_resolve_supertype_and_combination():
    assert {c.name for c in ONTO.resolve("polygon")} == {"triangle", "square", "pentagon"}
    assert [c.name for c in ONTO.resolve("striped triangle")] == ["striped", "triangle"]
    assert ONTO.resolve("crimson")[0].name == "red"
    with pytest.raises(ValueError, match="one per domain"):
        ONTO.resolve("red blue")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6))
def test_renderer_is_deterministic_and_in_range(seed, n):
    a, b = render(sample_scenes(n, seed)), render(sample_scenes(n, seed))
    assert a.shape == (n, 3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_rendered_colour_matches_label():
    # the brightest pixels of a solid shape carry its colour: the label's dominant channel wins
    onto = ONTO
    for colour, channel in (("red", 0), ("green", 1), ("blue", 2)):
        scenes = sample_scenes(8, 3, colour=onto.index(colour), texture=onto.index("solid"))
        images = render(scenes)
        means = images.reshape(8, 3, -1).max(axis=2)
        assert (means.argmax(axis=1) == channel).all(), colour


def test_shape_labels_change_the_silhouette():
    masks = []
    for shape in ("circle", "square", "ring", "cross"):
        scenes = sample_scenes(1, 5, shape=ONTO.index(shape), texture=ONTO.index("solid"))
        masks.append(render(scenes)[0].max(0) > 0.5)
    area = [m.sum() for m in masks]
    assert len(set(area)) == 4, area  # different shapes cover different pixel sets
    ring, circle = masks[2], masks[0]
    assert ring.sum() < circle.sum()  # the ring has a hole


def test_textures_differ_in_high_frequency_energy():
    energy = {}
    for texture in ("solid", "striped", "checkered"):
        scenes = sample_scenes(16, 7, texture=ONTO.index(texture), shape=ONTO.index("square"))
        gray = render(scenes).mean(1)
        energy[texture] = np.abs(np.diff(gray, axis=2)).mean()
    assert energy["solid"] < energy["striped"] and energy["solid"] < energy["checkered"]


def test_forget_pairs_avoid_concepts_forgotten_earlier():
    import numpy as np
    from obliviate.world import WorldPrompts
    prompts = WorldPrompts()
    pairs = prompts.forget_pairs(("dotted",), None, 64, np.random.default_rng(0), avoid=("red", "circle", "dotted"))
    assert all("dotted" in p.target and "red" not in p.target and "circle" not in p.target for p in pairs)
    # when nothing can avoid them, the pairs still come (the avoided concept is the only choice)
    every_colour = tuple(prompts.ontology.names("colour"))
    assert len(prompts.forget_pairs(("dotted",), None, 4, np.random.default_rng(0), avoid=every_colour)) == 4
