"""Prompts for a request's targets, anchors and retained concepts.

Methods never build prompts themselves: they ask a ``PromptSource``. ``WorldPrompts`` knows the
embedded world's ground truth (which concepts exist, which are siblings); ``FreeTextPrompts``
serves Stable Diffusion, where a target is any text and retained concepts are a user list.
Classifier targets (``obliviate.classifiers.targets.DataTargets``) are a ``TargetSource``: they
validate what a request names but build no prompts.

World prompts are built from label rows and templates, never by editing a prompt's text, so a
concept word inside another ("red" in "checkered") cannot be hit by a swap. They speak the
model's language: the prompts a method trains on name each concept by any word the model was
trained on (its name or a training synonym), since forgetting only the name leaves the synonyms
drawing the concept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from .ontology import DEFAULT_ONTOLOGY, Ontology
from .prompts import DEFAULT_LANGUAGE, Language, format_prompt


@dataclass(frozen=True)
class PromptPair:
    """A prompt that expresses the targets and the same prompt with the targets replaced by the
    anchor (or dropped when there is no anchor). ``labels`` is the world's label row of the target
    prompt (one class index per domain); empty for free text."""

    target: str
    anchor: str
    labels: tuple[int, ...] = ()


@runtime_checkable
class TargetSource(Protocol):
    """What a store's requests may name."""

    def validate(self, targets: tuple[str, ...], anchor: str | None) -> None:
        """Raise ``ValueError`` saying what is wrong when ``targets`` or ``anchor`` cannot be forgotten."""


@runtime_checkable
class PromptSource(TargetSource, Protocol):
    """Prompts for text-to-image requests. Every method draws only from the ``rng`` it is given."""

    def forget_pairs(self, targets: tuple[str, ...], anchor: str | None, n: int, rng: np.random.Generator,
                     avoid: tuple[str, ...] = (), partial: float = 0.0) -> list[PromptPair]:
        """``n`` prompts showing a target, each with its anchor prompt; with ``partial``, each
        attribute besides the targets' is left out of both with that chance (none in free text)."""

    def random_anchor_pairs(self, targets: tuple[str, ...], n: int, rng: np.random.Generator,
                            avoid: tuple[str, ...] = (), partial: float = 0.0,
                            keep_out: tuple[str, ...] = ()) -> list[PromptPair]:
        """Forget prompts whose anchor shows a random retained concept in the target's place;
        neither shows a concept in ``avoid`` when the world allows, and no concept in ``keep_out``
        takes the target's place. ``partial`` as in ``forget_pairs``."""

    def retain_prompts(self, forgotten: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
        """Prompts showing none of ``forgotten``; empty when nothing is known to be retained."""

    def supertype_pairs(self, forgotten: tuple[str, ...], n: int, rng: np.random.Generator) -> list[PromptPair]:
        """Retained prompts naming the supertype of a ``forgotten`` concept in a retained member's
        place, each with the same prompt naming that member."""

    def unnamed_pairs(self, forgotten: tuple[str, ...], n: int, rng: np.random.Generator) -> list[PromptPair]:
        """Retained prompts that leave the domain of a ``forgotten`` concept unnamed, each with the
        same prompt naming a retained concept of that domain."""

    def related_prompts(self, targets: tuple[str, ...], forgotten: tuple[str, ...], n: int,
                        rng: np.random.Generator) -> list[str]:
        """Up to ``n`` prompts of retained concepts close to the targets (their siblings)."""

    def concept_words(self, targets: tuple[str, ...]) -> list[str]:
        """Every word naming a target."""

    def supertype_of(self, targets: tuple[str, ...]) -> str:
        """The supertype the targets belong to (the group an adapter method files them under)."""

    def supertype_prompts(self, supertype: str) -> list[str]:
        """Prompts that name ``supertype`` itself rather than one of its concepts."""

    def concept_mask(self, terms: tuple[str, ...]) -> np.ndarray:
        """Which known concepts the terms cover (empty for free text)."""

    def shows_uncovered(self, labels: np.ndarray, covered: np.ndarray, terms: tuple[str, ...]) -> np.ndarray:
        """Per label row: does it show one of ``terms`` that its ``covered`` row does not include?"""


def _describe(words: dict[str, str | None]) -> str:
    """'a striped red triangle' from whichever of texture/colour/shape are given."""
    parts = [words.get(d) for d in ("texture", "colour", "shape")]
    return "a " + " ".join(p for p in parts if p)


def _fill(template: str, words: dict[str, str | None]) -> str:
    """``template`` with ``words``; the plain description when an attribute is left out (``None``),
    since every training template names all three."""
    return format_prompt(template, **words) if all(words.values()) else _describe(words)


@dataclass(frozen=True)
class WorldPrompts:
    """Prompts of the embedded world in ``lang``, the language of the model they are for."""

    ontology: Ontology = DEFAULT_ONTOLOGY
    lang: Language = DEFAULT_LANGUAGE

    @property
    def templates(self) -> tuple[str, ...]:
        """The training templates of the model's language that name every attribute."""
        return self.lang.full_templates

    def validate(self, targets: tuple[str, ...], anchor: str | None) -> None:
        concepts = [c for t in targets for c in self.ontology.resolve(t)]
        if anchor is not None:
            anchor_concept = self.ontology.get(anchor)
            domains = {c.domain for c in concepts}
            if domains != {anchor_concept.domain}:
                raise ValueError(f"Anchor {anchor!r} is a {anchor_concept.domain}; it must be in the targets' domain "
                                 f"({', '.join(sorted(domains))}) so it can take their place in prompts.")
            if anchor_concept in concepts:
                raise ValueError(f"Anchor {anchor!r} is itself a target of this request.")

    def target_concepts(self, targets: tuple[str, ...]):
        return tuple(c for t in targets for c in self.ontology.resolve(t))

    def target_groups(self, targets: tuple[str, ...]) -> list[dict[str, set[int]]]:
        """Each target term as {domain: allowed class indices}: a combination restricts several
        domains at once, a supertype allows several classes of one domain."""
        groups = []
        for term in targets:
            group: dict[str, set[int]] = {}
            for c in self.ontology.resolve(term):
                group.setdefault(c.domain, set()).add(self.ontology.index(c.name))
            groups.append(group)
        return groups

    def sample_labels(self, n: int, rng: np.random.Generator, include: list[dict[str, set[int]]] | None = None,
                      exclude: list[dict[str, set[int]]] | None = None) -> np.ndarray:
        """(n, 3) label rows that match one of ``include`` (if given) and none of ``exclude``."""
        counts = [len(self.ontology.in_domain(d)) for d in self.ontology.domains]
        rows, attempts = [], 0
        while len(rows) < n:
            attempts += 1
            if attempts > 1000 * max(n, 1):
                raise ValueError("No concept combination matches the requested targets without showing an excluded one.")
            row = [int(rng.integers(c)) for c in counts]
            if include:
                group = include[int(rng.integers(len(include)))]
                for d, allowed in group.items():
                    row[self.ontology.domains.index(d)] = int(rng.choice(sorted(allowed)))
            if exclude and any(self._matches(row, g) for g in exclude):
                continue
            rows.append(row)
        return np.array(rows)

    def _matches(self, row, group: dict[str, set[int]]) -> bool:
        """Does the label row show the concept(s) of ``group``?"""
        return all(row[self.ontology.domains.index(d)] in allowed for d, allowed in group.items())

    def _shown_domains(self, row, groups: list[dict[str, set[int]]]) -> set[str]:
        """The domains of the target groups label ``row`` shows."""
        return {d for g in groups if self._matches(row, g) for d in g}

    def words(self, row) -> dict[str, str]:
        """The concept names of a label row, by domain."""
        return {d: self.ontology.names(d)[i] for d, i in zip(self.ontology.domains, row)}

    def known_words(self, row, rng: np.random.Generator) -> dict[str, str]:
        """Per domain, a random word the language names the row's concept with."""
        return {d: self.lang.random_word(self.ontology.in_domain(d)[i], rng) for d, i in zip(self.ontology.domains, row)}

    def prompt(self, row, template: str, words: dict[str, str] | None = None) -> str:
        """``template`` filled with the concept names of label ``row``; ``words`` puts other words
        in some domains' places (an anchor, a placeholder token)."""
        return format_prompt(template, **{**self.words(row), **(words or {})})

    def short_prompt(self, row, keep) -> str:
        """The plain description of label ``row`` naming only the domains in ``keep`` ("a striped
        triangle"): no training template names fewer than all three attributes."""
        return _describe({d: w for d, w in self.words(row).items() if d in keep})

    def _forget_rows(self, targets, n, rng, avoid=(), partial=0.0) -> list[tuple[np.ndarray, str, dict[str, str | None]]]:
        """Label rows showing a target, each with a random training template and known words;
        with ``partial``, each domain no target of the row is in has its word left out (``None``)
        with that chance."""
        groups = self.target_groups(targets)
        targeted = {c.name for c in self.target_concepts(targets)}
        avoided = [g for term in avoid if not {c.name for c in self.ontology.resolve(term)} & targeted
                   for g in self.target_groups((term,))]
        try:
            rows = self.sample_labels(n, rng, include=groups, exclude=avoided or None)
        except ValueError:
            rows = self.sample_labels(n, rng, include=groups)
        out = []
        for row in rows:
            template, words = self.templates[int(rng.integers(len(self.templates)))], self.known_words(row, rng)
            if partial:  # no draws otherwise: requests made before the option replay as they were
                shown = self._shown_domains(row, groups)
                words = {d: None if d not in shown and rng.random() < partial else w for d, w in words.items()}
            out.append((row, template, words))
        return out

    def forget_pairs(self, targets: tuple[str, ...], anchor: str | None, n: int, rng: np.random.Generator,
                     avoid: tuple[str, ...] = (), partial: float = 0.0) -> list[PromptPair]:
        """Training-template prompts showing a target in known words, each with its anchor prompt:
        the same template and words with the anchor in the target's place, or the plain
        description without the domains of the targets the row shows when there is no anchor
        ("a dotted red triangle" keeps "dotted" when the targets are striped and triangle).
        Prompts showing a concept in ``avoid`` (e.g. one forgotten earlier) are left out when the
        world allows. With ``partial``, each other attribute is left out of prompt and anchor
        with that chance ("a striped triangle" / "a triangle"): the forms a later request's
        anchors take once it erases that attribute's word."""
        groups = self.target_groups(targets)
        anchor_concept = self.ontology.get(anchor) if anchor else None
        pairs = []
        for row, template, words in self._forget_rows(targets, n, rng, avoid, partial):
            if anchor_concept is not None:
                anchor_prompt = _fill(template, {**words, anchor_concept.domain: anchor_concept.name})
            else:
                shown = self._shown_domains(row, groups)
                anchor_prompt = _describe({d: (None if d in shown else w) for d, w in words.items()})
            pairs.append(PromptPair(_fill(template, words), anchor_prompt, tuple(int(i) for i in row)))
        return pairs

    def concept_mask(self, terms: tuple[str, ...]) -> np.ndarray:
        """Which of the ontology's concepts the terms cover, as a boolean vector."""
        covered = {c.name for c in self.target_concepts(terms)}
        return np.array([c.name in covered for c in self.ontology.concepts])

    def shows_uncovered(self, labels: np.ndarray, covered: np.ndarray, terms: tuple[str, ...]) -> np.ndarray:
        """Per label row: does it show one of ``terms`` none of whose concepts its ``covered`` row
        (a `concept_mask`) includes? E.g. a row from a request forgetting striped that shows red
        is flagged once red is forgotten too."""
        flagged = np.zeros(len(labels), dtype=bool)
        for term, group in zip(terms, self.target_groups(terms)):
            shows = np.ones(len(labels), dtype=bool)
            for domain, allowed in group.items():
                shows &= np.isin(labels[:, self.ontology.domains.index(domain)], sorted(allowed))
            flagged |= shows & ~(covered & self.concept_mask((term,))).any(1)
        return flagged

    def random_anchor_pairs(self, targets: tuple[str, ...], n: int, rng: np.random.Generator,
                            avoid: tuple[str, ...] = (), partial: float = 0.0,
                            keep_out: tuple[str, ...] = ()) -> list[PromptPair]:
        """Forget prompts whose anchor puts a random other concept of its domain in each target
        concept's place, in the same template (the "random label" of SalUn for generation).
        Neither the prompts nor the concepts put in a target's place show one in ``avoid``, and
        no concept of ``keep_out`` (e.g. one forgotten earlier) takes a target's place unless
        the domain has no other; ``partial`` leaves out other attributes as in ``forget_pairs``."""
        targeted = {c.name for c in self.target_concepts(targets)}
        excluded = targeted | {c.name for c in self.target_concepts(avoid)}
        kept_out = excluded | {c.name for c in self.target_concepts(keep_out)}
        # per domain, what may take a target's place: a concept forgotten earlier beats the target itself
        others = {d: [c for c in self.ontology.names(d) if c not in kept_out]
                  or [c for c in self.ontology.names(d) if c not in excluded] for d in self.ontology.domains}
        pairs = []
        for row, template, words in self._forget_rows(targets, n, rng, avoid, partial):
            swapped = dict(words)
            for domain, name in self.words(row).items():
                if name in targeted and others[domain]:
                    swapped[domain] = others[domain][int(rng.integers(len(others[domain])))]
            pairs.append(PromptPair(_fill(template, words), _fill(template, swapped), tuple(int(i) for i in row)))
        return pairs

    def retain_prompts(self, forgotten: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
        """Training-template prompts in known words that show none of the ``forgotten`` terms."""
        groups = self.target_groups(forgotten) if forgotten else []
        rows = self.sample_labels(n, rng, exclude=groups)
        return [format_prompt(self.templates[int(rng.integers(len(self.templates)))], **self.known_words(row, rng))
                for row in rows]

    def supertype_pairs(self, forgotten: tuple[str, ...], n: int, rng: np.random.Generator) -> list[PromptPair]:
        """Training-template prompts of retained concepts that name the supertype of a ``forgotten``
        concept in the place of one of its retained members, each with the same prompt naming that
        member ("a dotted cool square" / "a dotted green square" once blue is forgotten), cycling
        through the supertypes that have a retained member. Neither shows a forgotten concept;
        ``labels`` is the member's row."""
        concepts = self.target_concepts(forgotten)
        named, excluded, supertypes = {c.name for c in concepts}, self.target_groups(forgotten), self.ontology.supertypes
        groups = []  # (supertype, its domain, the label group of its retained members)
        for parent in sorted({c.parent for c in concepts}):
            members = [m for m in supertypes[parent] if m not in named]
            if members:
                domain = self.ontology.get(members[0]).domain
                groups.append((parent, domain, {domain: {self.ontology.index(m) for m in members}}))
        pairs = []
        for i in range(n if groups else 0):
            parent, domain, include = groups[i % len(groups)]
            row = self.sample_labels(1, rng, include=[include], exclude=excluded)[0]
            template, words = self.templates[int(rng.integers(len(self.templates)))], self.known_words(row, rng)
            pairs.append(PromptPair(format_prompt(template, **{**words, domain: parent}),
                                    format_prompt(template, **words), tuple(int(i) for i in row)))
        return pairs

    def unnamed_pairs(self, forgotten: tuple[str, ...], n: int, rng: np.random.Generator) -> list[PromptPair]:
        """Prompts of retained concepts that leave the domain of a ``forgotten`` concept unnamed,
        each with the same prompt naming the row's concept there ("a red square" / "a solid red
        square" once dotted is forgotten), cycling through those domains that keep a retained
        concept. A model draws its default where a prompt names nothing, and that default may be
        the forgotten concept (``shapes-t2i`` draws dotted for most prompts naming no texture).
        Neither names a forgotten concept; ``labels`` is the named prompt's row."""
        concepts = self.target_concepts(forgotten)
        named, excluded = {c.name for c in concepts}, self.target_groups(forgotten)
        domains = [d for d in self.ontology.domains
                   if any(c.domain == d for c in concepts) and set(self.ontology.names(d)) - named]
        pairs = []
        for i in range(n if domains else 0):
            row = self.sample_labels(1, rng, exclude=excluded)[0]
            words = self.known_words(row, rng)
            pairs.append(PromptPair(_describe({**words, domains[i % len(domains)]: None}), _describe(words),
                                    tuple(int(v) for v in row)))
        return pairs

    def related_prompts(self, targets: tuple[str, ...], forgotten: tuple[str, ...], n: int,
                        rng: np.random.Generator) -> list[str]:
        """Prompts naming a sibling of a target (same supertype) that is neither a target nor
        forgotten, cycling through the siblings; none shows a target (a request forgetting striped
        and red protects "a dotted blue star", not "a dotted red star")."""
        concepts = self.target_concepts(targets)
        excluded = {c.name for c in concepts} | {c.name for c in self.target_concepts(forgotten)}
        siblings = sorted({s for c in concepts for s in self.ontology.supertypes[c.parent] if s not in excluded})
        if not siblings:
            return []
        return [self.forget_pairs((siblings[i % len(siblings)],), None, 1, rng, avoid=targets)[0].target for i in range(n)]

    def concept_words(self, targets: tuple[str, ...]) -> list[str]:
        """Every word the model knows a target concept by (its name and the language's training
        synonyms), e.g. for text-space methods. Held-out synonyms are never among them."""
        return [w for c in self.target_concepts(targets) for w in self.lang.words(c)]

    def supertype_of(self, targets: tuple[str, ...]) -> str:
        """The parents of the targets' concepts, e.g. ``polygon`` for triangle and
        ``pattern+polygon`` for "striped triangle"."""
        return "+".join(sorted({c.parent for c in self.target_concepts(targets)}))

    def supertype_prompts(self, supertype: str) -> list[str]:
        """Short prompts naming each supertype word of ``supertype`` ("+"-joined) and nothing
        else: "a polygon", "a polygon shape", "an image of a polygon", ..."""
        prompts = []
        for parent in supertype.split("+"):
            if parent not in self.ontology.supertypes:
                raise ValueError(f"{parent!r} is not a supertype of the embedded world; choose from "
                                 f"{', '.join(self.ontology.supertypes)}.")
            domain = self.ontology.get(self.ontology.supertypes[parent][0]).domain
            prompts += [parent, f"a {parent}", f"an image of a {parent}", f"a {parent} {domain}", f"{parent} {domain}s",
                        f"a picture of a {parent} {domain}"]
        return prompts


FREE_TEXT_TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a painting of {}", "a picture showing {}")


@dataclass(frozen=True)
class FreeTextPrompts:
    """Targets and anchors are any text (Stable Diffusion). ``retain`` lists concepts to keep."""

    retain: tuple[str, ...] = field(default_factory=tuple)

    def validate(self, targets: tuple[str, ...], anchor: str | None) -> None:
        if anchor is not None and anchor in targets:
            raise ValueError(f"Anchor {anchor!r} is itself a target of this request.")

    def target_concepts(self, targets):
        return ()

    def forget_pairs(self, targets, anchor, n, rng, avoid=(), partial=0.0) -> list[PromptPair]:
        # free text has no attributes to leave out: ``partial`` changes nothing
        pairs = []
        for i in range(n):
            template = FREE_TEXT_TEMPLATES[int(rng.integers(len(FREE_TEXT_TEMPLATES)))]
            target = targets[i % len(targets)]
            pairs.append(PromptPair(template.format(target), template.format(anchor) if anchor else ""))
        return pairs

    def concept_mask(self, terms) -> np.ndarray:
        return np.zeros(0, dtype=bool)  # free text names no known concepts

    def shows_uncovered(self, labels, covered, terms) -> np.ndarray:
        return np.zeros(len(labels), dtype=bool)

    def random_anchor_pairs(self, targets, n, rng, avoid=(), partial=0.0, keep_out=()) -> list[PromptPair]:
        kept = [r for r in self.retain if r not in targets + keep_out] or [""]
        return [PromptPair(p.target, kept[int(rng.integers(len(kept)))]) for p in self.forget_pairs(targets, None, n, rng)]

    def retain_prompts(self, forgotten, n, rng) -> list[str]:
        """Prompts of the retained concepts; empty when the store names none."""
        kept = [r for r in self.retain if r not in forgotten]
        if not kept:
            return []
        return [FREE_TEXT_TEMPLATES[int(rng.integers(len(FREE_TEXT_TEMPLATES)))].format(kept[i % len(kept)]) for i in range(n)]

    def related_prompts(self, targets, forgotten, n, rng) -> list[str]:
        return []  # free text knows no siblings

    def supertype_pairs(self, forgotten, n, rng) -> list[PromptPair]:
        raise ValueError("Free-text targets have no known supertype or members; list the group's other members to "
                         "keep with the store's retain concepts instead.")

    def unnamed_pairs(self, forgotten, n, rng) -> list[PromptPair]:
        raise ValueError("Free-text targets have no known domain to leave unnamed; list prompts to keep, and what "
                         "they should draw in place of a forgotten concept, with the store's retain concepts instead.")

    def concept_words(self, targets) -> list[str]:
        return list(targets)

    def supertype_of(self, targets) -> str:
        raise ValueError("Free-text targets have no known supertype; name the group the request belongs to "
                         "(e.g. --set group=\"painting style\").")

    def supertype_prompts(self, supertype) -> list[str]:
        return [t.format(supertype) for t in FREE_TEXT_TEMPLATES]
