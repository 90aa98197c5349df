import re

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from obliviate.world import (DEFAULT_ONTOLOGY, HELDOUT_TEMPLATES, LANGUAGES, SPLITS, Concept,
                             FreeTextPrompts, Ontology, WorldPrompts, prompt_for, render, sample_scenes, training_prompts)

ONTO = DEFAULT_ONTOLOGY


def whole_word(word: str) -> str:
    """A pattern for ``word`` standing alone ("red", not the "red" in "reddish" or "blood-red")."""
    return rf"(?<![\w-]){re.escape(word)}(?![\w-])"


def test_ontology_meets_the_world_spec():
    assert len(ONTO.in_domain("shape")) >= 8 and len({c.parent for c in ONTO.in_domain("shape")}) >= 3
    assert len(ONTO.in_domain("colour")) >= 8 and len({c.parent for c in ONTO.in_domain("colour")}) >= 2
    assert len(ONTO.in_domain("texture")) >= 5
    for name in ("triangle", "square", "circle", "star", "red", "green", "blue", "yellow",
                 "solid", "striped", "dotted", "checkered"):
        ONTO.get(name)
    for lang in LANGUAGES.values():
        assert len(lang.full_templates) >= 6 and len(HELDOUT_TEMPLATES) >= 3
        assert not set(lang.templates) & set(HELDOUT_TEMPLATES)
    assert set(LANGUAGES["v1"].templates) < set(LANGUAGES["v2"].templates)
    for c in ONTO.concepts:
        assert len(c.train_synonyms) >= 6 and c.heldout_synonyms  # v2: at least 6 training words a concept
        assert LANGUAGES["v1"].words(c) == (c.name, c.train_synonyms[0])


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
            words = {"heldout_synonym": c.heldout_synonyms, "train_synonym": c.train_synonyms}.get(split, (c.name,))
            assert any(w in prompt for w in words), (split, c.name, prompt)


def test_v1_language_reproduces_the_prompts_shapes_t2i_v1_was_trained_on():
    labels = np.array([[i % 9, i % 8, i % 5] for i in range(4)])
    assert training_prompts(labels, np.random.default_rng(3), lang=LANGUAGES["v1"]) == [
        "a red trigon with a solid pattern", "a drawing of a tangerine square that is shaded",
        "yellow pentagon, striped", "a pink disc with a dotted pattern"]


def test_train_synonym_split_cycles_through_every_training_synonym():
    red = ONTO.get("red")
    row = (0, ONTO.index("red"), 0)
    seen = {w for v in range(len(red.train_synonyms)) for w in red.train_synonyms if f" {w} " in f" {prompt_for(row, 'train_synonym', v)} ".replace(",", " ")}
    assert seen == set(red.train_synonyms)
    assert "scarlet" in prompt_for(row, "train_synonym", 0, lang=LANGUAGES["v1"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), target=st.sampled_from(["red", "striped", "triangle", "polygon", "striped triangle"]),
       lang=st.sampled_from(list(LANGUAGES.values())))
def test_method_prompts_name_targets_in_every_known_word_and_never_a_heldout_one(seed, target, lang):
    prompts = WorldPrompts(lang=lang)
    rng = np.random.default_rng(seed)
    concepts = prompts.target_concepts((target,))
    pairs = prompts.forget_pairs((target,), None, 64, rng)
    retained = prompts.retain_prompts((target,), 32, rng)
    text = " | ".join(p.target for p in pairs) + " | " + " | ".join(retained)
    for c in ONTO.concepts:
        for w in c.heldout_synonyms:
            assert f" {w} " not in f" {text} ".replace(",", " "), w
    for p in pairs:  # every forget prompt names each target concept by a word the language knows (or its plural)
        for domain in {c.domain for c in concepts}:
            assert any(re.search(rf"\b{re.escape(w)}(e?s)?\b", p.target)
                       for c in concepts if c.domain == domain for w in lang.words(c)), p.target
    used = {w for c in concepts for w in lang.synonyms_of(c) if f" {w} " in f" {text} "}
    assert used, "forget prompts never use a training synonym"
    assert set(prompts.concept_words((target,))) == {w for c in concepts for w in lang.words(c)}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       forgotten=st.lists(st.sampled_from(["red", "blue", "striped", "circle", "star", "heart", "polygon"]), min_size=1,
                          max_size=3, unique=True))
def test_supertype_pairs_put_a_forgotten_concepts_supertype_in_a_retained_members_place(seed, forgotten):
    prompts, forgotten = WorldPrompts(), tuple(forgotten)
    named = {c.name for c in prompts.target_concepts(forgotten)}
    parents = sorted({c.parent for c in prompts.target_concepts(forgotten)
                      if set(ONTO.supertypes[c.parent]) - named})  # "polygon" itself leaves no member to draw
    pairs = prompts.supertype_pairs(forgotten, 12, np.random.default_rng(seed))
    assert len(pairs) == (12 if parents else 0)
    for i, pair in enumerate(pairs):  # the supertypes take turns, each in a retained member's place
        parent = parents[i % len(parents)]
        domain = ONTO.get(ONTO.supertypes[parent][0]).domain
        member = ONTO.names(domain)[pair.labels[ONTO.domains.index(domain)]]
        assert member in ONTO.supertypes[parent] and member not in named
        assert not {ONTO.names(d)[k] for d, k in zip(ONTO.domains, pair.labels)} & named
        assert re.search(rf"\b{parent}", pair.target) and pair.target != pair.anchor, pair
        assert any(re.search(rf"\b{re.escape(w)}", pair.anchor) for w in prompts.lang.words(ONTO.get(member))), pair
    with pytest.raises(ValueError, match="no known supertype"):
        FreeTextPrompts(retain=("a cat",)).supertype_pairs(("van gogh",), 4, np.random.default_rng(0))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       forgotten=st.lists(st.sampled_from(["red", "blue", "dotted", "circle", "heart", "warm"]), min_size=1, max_size=3,
                          unique=True))
@example(seed=571982052, forgotten=["red", "heart"])  # CI's draw: "block" (square) inside "block-coloured" (solid)
def test_unnamed_pairs_leave_a_forgotten_concepts_domain_out_and_name_a_retained_concept_there(seed, forgotten):
    prompts, forgotten = WorldPrompts(), tuple(forgotten)
    concepts = prompts.target_concepts(forgotten)
    named = {c.name for c in concepts}
    domains = [d for d in ONTO.domains if any(c.domain == d for c in concepts)]  # each keeps a retained concept here
    pairs = prompts.unnamed_pairs(forgotten, 9, np.random.default_rng(seed))
    assert len(pairs) == 9
    for i, pair in enumerate(pairs):  # the domains take turns
        shown = {d: ONTO.names(d)[k] for d, k in zip(ONTO.domains, pair.labels)}
        assert not set(shown.values()) & named
        for concept in shown.values():
            assert any(re.search(rf"\b{re.escape(w)}\b", pair.anchor) for w in prompts.lang.words(ONTO.get(concept))), pair
        # the prompt is the anchor without the word of the row's concept in the left-out domain (a whole
        # word: "block" names a square inside "a block-coloured grass-green block" too)
        left_out = prompts.lang.words(ONTO.get(shown[domains[i % len(domains)]]))
        assert any(re.sub(rf" {re.escape(w)}(?= |$)", "", pair.anchor, count=1) == pair.target for w in left_out), pair
    with pytest.raises(ValueError, match="no known domain"):
        FreeTextPrompts(retain=("a cat",)).unnamed_pairs(("van gogh",), 4, np.random.default_rng(0))


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
    index = {d: {n: i for i, n in enumerate(prompts.ontology.names(d))} for d in prompts.ontology.domains}
    assert all(p.labels[2] == index["texture"]["dotted"] and p.labels[1] != index["colour"]["red"]
               and p.labels[0] != index["shape"]["circle"] for p in pairs)
    # when nothing can avoid them, the pairs still come (the avoided concept is the only choice)
    every_colour = tuple(prompts.ontology.names("colour"))
    assert len(prompts.forget_pairs(("dotted",), None, 4, np.random.default_rng(0), avoid=every_colour)) == 4


def test_random_anchors_avoid_concepts_forgotten_earlier_in_prompt_and_anchor():
    """SalUn's and SafeGen's pairs: neither the row nor the concept put in the target's place
    is one an earlier request forgot."""
    import re
    import numpy as np
    from obliviate.world import WorldPrompts
    prompts = WorldPrompts()
    striped = [w for c in prompts.target_concepts(("striped",)) for w in prompts.lang.words(c)]
    for avoid, allowed in (((), True), (("striped", "red"), False)):
        pairs = prompts.random_anchor_pairs(("dotted",), 200, np.random.default_rng(0), avoid=avoid)
        shows_red = [p.labels[1] == prompts.ontology.index("red") for p in pairs]
        striped_in_place = [any(re.search(whole_word(w), p.anchor) for w in striped) for p in pairs]
        assert any(shows_red) is allowed and any(striped_in_place) is allowed


def test_random_anchors_keep_out_concepts_from_the_targets_place_only():
    """``keep_out`` (swap_anchors passes the concepts forgotten earlier): striped never takes
    dotted's place, but prompts may still show red."""
    import numpy as np
    from obliviate.world import WorldPrompts
    prompts = WorldPrompts()
    pairs = prompts.random_anchor_pairs(("dotted",), 200, np.random.default_rng(0), keep_out=("striped", "red"))
    striped = [w for c in prompts.target_concepts(("striped",)) for w in prompts.lang.words(c)]
    assert not any(re.search(whole_word(w), p.anchor) for p in pairs for w in striped)
    assert any(p.labels[1] == prompts.ontology.index("red") for p in pairs)
    # every other texture kept out: one of them, never dotted itself, takes dotted's place
    others = tuple(t for t in prompts.ontology.names("texture") if t != "dotted")
    pairs = prompts.random_anchor_pairs(("dotted",), 50, np.random.default_rng(0), keep_out=others)
    dotted = [w for c in prompts.target_concepts(("dotted",)) for w in prompts.lang.words(c)]
    assert not any(re.search(whole_word(w), p.anchor) for p in pairs for w in dotted), pairs[:3]


def test_anchor_of_a_several_target_request_drops_only_the_targets_the_prompt_shows():
    """Targets striped and triangle: "a dotted red triangle" anchors to "a dotted red", not "a red"."""
    prompts = WorldPrompts()
    names = {d: prompts.ontology.names(d) for d in prompts.ontology.domains}

    def names_it(text, concept):
        return any(re.search(rf"\b{re.escape(w)}\b", text) for w in prompts.concept_words((concept,)))

    for p in prompts.forget_pairs(("striped", "triangle"), None, 64, np.random.default_rng(0)):
        shown = {d: names[d][i] for d, i in zip(prompts.ontology.domains, p.labels)}
        assert shown["shape"] == "triangle" or shown["texture"] == "striped"
        for concept in shown.values():
            assert names_it(p.anchor, concept) == (concept not in ("striped", "triangle")), (p, concept)


@settings(max_examples=12, deadline=None)
@given(target=st.sampled_from(["striped", "red", "triangle", "star"]), anchor=st.sampled_from([None, "other"]),
       seed=st.integers(0, 2**16))
def test_partial_forget_prompts_leave_an_attribute_out_of_prompt_and_anchor_alike(target, anchor, seed):
    """With ``partial``, each attribute besides the target's is named by both the prompt and its
    anchor or by neither; the target is always named; about that share of them is left out."""
    prompts = WorldPrompts(lang=LANGUAGES["v1"])  # v2's plurals would hide a word from the match
    domain = prompts.ontology.get(target).domain
    if anchor:  # another concept of the target's domain
        anchor = next(n for n in prompts.ontology.names(domain) if n != target)

    def names_it(text, concept):
        return any(re.search(whole_word(w), text) for w in prompts.concept_words((concept,)))

    pairs = prompts.forget_pairs((target,), anchor, 100, np.random.default_rng(seed), partial=0.5)
    kept = []
    for p in pairs:
        shown = {d: prompts.ontology.names(d)[i] for d, i in zip(prompts.ontology.domains, p.labels)}
        assert names_it(p.target, target) and not names_it(p.anchor, target)
        assert anchor is None or names_it(p.anchor, anchor)
        for d, concept in shown.items():
            if d != domain:
                assert names_it(p.target, concept) == names_it(p.anchor, concept), (p, concept)
                kept.append(names_it(p.target, concept))
    assert 0.35 < np.mean(kept) < 0.65


def test_partial_forget_prompts_off_and_full():
    """``partial=0`` draws exactly what the code before the option drew (the pairs below are its
    output at commit d0e36f9), so requests made before it replay as they were; ``partial=1``
    leaves only the target."""
    prompts = WorldPrompts()
    assert [(p.target, p.anchor) for p in prompts.forget_pairs(("dotted",), None, 3, np.random.default_rng(3))] == [
        ("vermilion plus, freckled", "a vermilion plus"),
        ("draw a tangerine five-sided polygon with a pointillist surface", "a tangerine five-sided polygon"),
        ("a sketch of a dotty cross, emerald", "a emerald cross")]
    assert [(p.target, p.anchor) for p in prompts.random_anchor_pairs(("dotted",), 2, np.random.default_rng(3))] == [
        ("a dotted-looking cross shape painted red", "a gradient-looking cross shape painted red"),
        ("the persimmon five-cornered shape, dotty", "the persimmon five-cornered shape, solid")]
    assert {(p.target.split()[0], p.anchor) for p in prompts.forget_pairs(("dotted",), None, 16, np.random.default_rng(3),
                                                                         partial=1.0)} == {("a", "a ")}
    swapped = prompts.random_anchor_pairs(("dotted",), 16, np.random.default_rng(3), partial=1.0)
    assert all(len(p.target.split()) == 2 and len(p.anchor.split()) == 2 for p in swapped)
    with pytest.raises(ValueError, match="partial_prompts"):
        from obliviate.training import GradientConfig
        GradientConfig(partial_prompts=1.5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), targets=st.sampled_from([("striped", "red"), ("dotted", "blue", "star"),
                                                                 ("red", "yellow", "triangle")]))
def test_related_prompts_of_a_several_target_request_show_no_target(seed, targets):
    """They are protected as retained prompts: a sibling of one target beside another target
    ("a dotted red star" for striped and red) would keep that target from being erased."""
    prompts = WorldPrompts()
    named = {c.name for c in prompts.target_concepts(targets)}
    words = [w for c in prompts.target_concepts(targets) for w in prompts.lang.words(c)]
    others = sorted((w for c in ONTO.concepts if c.name not in named for w in prompts.lang.words(c)), key=len, reverse=True)
    related = prompts.related_prompts(targets, targets, 48, np.random.default_rng(seed))
    assert len(related) == 48
    for prompt in related:
        rest = prompt
        for w in others:  # "ice blue" is cyan, not blue
            rest = re.sub(whole_word(w), " ", rest)
        assert not any(re.search(whole_word(w), rest) for w in words), prompt
