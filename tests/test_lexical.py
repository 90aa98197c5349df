import pytest
import torch
from hypothesis import given, settings, strategies as st

from obliviate.evaluation.lexical import WordReadoutConfig, fit_readout, word_in_prompt, word_states
from obliviate.world import DEFAULT_ONTOLOGY, LANGUAGES
from obliviate.world.prompts import plural

V2 = LANGUAGES["v2"]
WORDS = {d: [w for c in DEFAULT_ONTOLOGY.in_domain(d) for w in c.words] for d in DEFAULT_ONTOLOGY.domains}


@settings(max_examples=60, deadline=None)
@given(template=st.sampled_from(V2.full_templates), domain=st.sampled_from(DEFAULT_ONTOLOGY.domains),
       picks=st.tuples(*(st.sampled_from(WORDS[d]) for d in DEFAULT_ONTOLOGY.domains)))
def test_word_span_is_the_word_in_every_template(template, domain, picks):
    words = dict(zip(DEFAULT_ONTOLOGY.domains, picks))
    prompt, start, end = word_in_prompt(template, words, domain)
    assert prompt[start:end] in (words[domain], plural(words[domain]))
    # the span is where the template puts the domain, not an earlier occurrence of the same letters
    assert prompt[:start] == template.split("{shapes}" if "{shapes}" in template and domain == "shape"
                                            else f"{{{domain}}}")[0].format(**{**words, "shapes": plural(words["shape"])})


def test_word_in_prompt_refuses_a_template_without_the_domain():
    with pytest.raises(ValueError, match="full_templates"):
        word_in_prompt("a {texture} {shape}", {"shape": "circle", "colour": "red", "texture": "solid"}, "colour")


def test_word_states_read_the_word_tokens_and_drop_truncated_words(minilm):
    short = word_in_prompt("a {colour} {shape}, {texture}", {"shape": "circle", "colour": "crimson", "texture": "solid"}, "colour")
    filler = "very " * 40
    long = (f"a {filler}red circle", len(f"a {filler}"), len(f"a {filler}red"))
    states, kept = word_states(minilm, [short, long])
    assert kept.tolist() == [True, False]
    encoded = minilm.encode([short[0]]).states[0]
    assert torch.allclose(states[0], encoded[2])  # [CLS] a crimson: one word piece at position 2
    assert minilm.tokenizer.convert_ids_to_tokens(minilm.tokenize([short[0]])["input_ids"][0, 2].item()) == "crimson"


def test_readout_finds_a_signal_and_only_a_signal():
    generator = torch.Generator().manual_seed(0)
    classes, dim = 6, 32
    centres = 3 * torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat(40)
    train = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    config = WordReadoutConfig(steps=150, hidden=32, restarts=2)
    same = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    assert (fit_readout(train, labels, same, classes, config).argmax(-1) == labels).float().mean() > 0.95
    noise = 3 * torch.randn(len(labels), dim, generator=generator)  # carries nothing about the labels
    assert (fit_readout(train, labels, noise, classes, config).argmax(-1) == labels).float().mean() < 0.4
    first = fit_readout(train, labels, same, classes, config)
    assert torch.equal(first, fit_readout(train, labels, same, classes, config))  # seeded


def test_readout_config_refuses_nonsense():
    with pytest.raises(ValueError, match="restarts"):
        WordReadoutConfig(restarts=0)
