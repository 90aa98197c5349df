"""What a frozen text encoder tells a world model about words it was never trained on.

A world model learns its concept words from images. For a held-out synonym it has only the token
states the frozen encoder gives that word, so how well it can draw the word is limited by how much
of the word's meaning those states carry. ``heldout_word_readout`` measures that: a small MLP reads
a word's own token states (the mean over its word pieces, inside a random prompt of the language),
is trained to name the concept of every word the language knows, and is then asked about each
held-out synonym in fresh prompts. It is a probe, not a proof: a model that reads the same states
can do better by luck, but a readout far below a target says the encoder, not the training recipe,
is what stands in the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..seeding import seeded
from ..world import DEFAULT_LANGUAGE, DEFAULT_ONTOLOGY, Language, Ontology
from ..world.prompts import format_prompt, plural


@dataclass(frozen=True)
class WordReadoutConfig:
    contexts_per_word: int = 8  # prompts per known word (training rows)
    heldout_contexts: int = 16  # prompts per held-out word (test rows)
    hidden: int = 256
    steps: int = 400
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    dropout: float = 0.2
    restarts: int = 3  # probes from different seeds, averaged: one probe's verdict on 5-9 words is noisy
    seed: int = 0

    def __post_init__(self):
        for name in ("contexts_per_word", "heldout_contexts", "hidden", "steps", "restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"WordReadoutConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class WordReadout:
    """Share of a held-out word's prompts the probe names correctly: per domain and per word."""

    per_domain: dict[str, float]
    per_word: dict[str, float]


def word_in_prompt(template: str, words: dict[str, str], domain: str) -> tuple[str, int, int]:
    """The prompt for ``words`` (one per domain) and the character span of ``domain``'s word in it
    (its plural where the template asks for one)."""
    key = "{shapes}" if domain == "shape" and "{shapes}" in template else f"{{{domain}}}"
    if key not in template:
        raise ValueError(f"Template {template!r} does not name the {domain}; use a language's full_templates.")
    prompt = format_prompt(template, words["shape"], words["colour"], words["texture"])
    start = len(format_prompt(template.split(key)[0], words["shape"], words["colour"], words["texture"]))
    written = plural(words[domain]) if key == "{shapes}" else words[domain]
    return prompt, start, start + len(written)


def word_states(encoder, prompts: list[tuple[str, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean token state of each prompt's word span, as the UNet reads it (the encoder's last
    layer, truncated like the UNet's input); and which rows kept their word after truncation."""
    texts = [p for p, _, _ in prompts]
    states = encoder.encode(texts).states.cpu()
    offsets = encoder.tokenize(texts, return_offsets_mapping=True)["offset_mapping"].tolist()
    rows, kept = [], []
    for i, (_, start, end) in enumerate(prompts):
        tokens = [t for t, (a, b) in enumerate(offsets[i]) if b > a and a < end and b > start]
        kept.append(bool(tokens))
        rows.append(states[i, tokens].mean(0) if tokens else torch.zeros(states.shape[-1]))
    return torch.stack(rows), torch.tensor(kept)


def fit_readout(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, classes: int,
                config: WordReadoutConfig) -> torch.Tensor:
    """Probability that each test row is its class under an MLP fit on (train, labels), averaged
    over ``config.restarts`` seeds; returns (len(test), classes)."""
    mean, scale = train.mean(0), train.std(0) + 1e-5
    train, test = (train - mean) / scale, (test - mean) / scale
    probabilities = torch.zeros(len(test), classes)
    for restart in range(config.restarts):
        with seeded(config.seed + restart), torch.enable_grad():
            probe = nn.Sequential(nn.Linear(train.shape[1], config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(config.hidden, classes))
            optimizer = torch.optim.AdamW(probe.parameters(), config.learning_rate, weight_decay=config.weight_decay)
            for _ in range(config.steps):
                optimizer.zero_grad()
                nn.functional.cross_entropy(probe(train), labels).backward()
                optimizer.step()
        probe.eval()
        with torch.no_grad():
            probabilities += probe(test).softmax(-1) / config.restarts
    return probabilities


def heldout_word_readout(encoder, lang: Language = DEFAULT_LANGUAGE, ontology: Ontology = DEFAULT_ONTOLOGY,
                         config: WordReadoutConfig = WordReadoutConfig()) -> WordReadout:
    """How often a probe trained on the words ``lang`` knows names each held-out synonym's concept
    from the encoder's token states (see the module docstring)."""
    rng = np.random.default_rng(config.seed)
    per_domain, per_word = {}, {}
    for domain in ontology.domains:
        concepts = ontology.in_domain(domain)
        known = [(k, p) for k, c in enumerate(concepts) for w in lang.words(c)
                 for p in _contexts(word=w, domain=domain, n=config.contexts_per_word, lang=lang, ontology=ontology, rng=rng)]
        unseen = [(k, w, p) for k, c in enumerate(concepts) for w in c.heldout_synonyms
                  for p in _contexts(word=w, domain=domain, n=config.heldout_contexts, lang=lang, ontology=ontology, rng=rng)]
        if not unseen:
            continue
        train, kept = word_states(encoder, [p for _, p in known])
        labels = torch.tensor([k for k, _ in known])
        test, test_kept = word_states(encoder, [p for _, _, p in unseen])
        probabilities = fit_readout(train[kept], labels[kept], test, len(concepts), config)
        correct = probabilities.argmax(-1) == torch.tensor([k for k, _, _ in unseen])
        words = [w for _, w, _ in unseen]
        for word in dict.fromkeys(words):
            rows = torch.tensor([w == word for w in words]) & test_kept
            per_word[word] = round(correct[rows].float().mean().item(), 4)
        per_domain[domain] = round(float(np.mean([per_word[w] for w in dict.fromkeys(words)])), 4)
    return WordReadout(per_domain, per_word)


def _contexts(word: str, domain: str, n: int, lang: Language, ontology: Ontology,
              rng: np.random.Generator) -> list[tuple[str, int, int]]:
    """``n`` prompts of a random full template of ``lang`` with ``word`` as the domain's word and
    random known words elsewhere, each with the word's span."""
    rows = []
    for _ in range(n):
        words = {d: lang.random_word(ontology.in_domain(d)[rng.integers(len(ontology.in_domain(d)))], rng)
                 for d in ontology.domains}
        words[domain] = word
        rows.append(word_in_prompt(lang.full_templates[rng.integers(len(lang.full_templates))], words, domain))
    return rows
