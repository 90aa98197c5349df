"""The concept ontology of the embedded world: domains, concepts, supertypes and synonyms.

Every concept belongs to one domain (shape, colour, texture) and has a parent (its supertype,
e.g. ``polygon`` for ``triangle``). Synonyms are split: ``train_synonyms`` appear in training
prompts, ``heldout_synonyms`` never do, so we can test whether forgetting generalises beyond the
exact words of a request.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Concept:
    name: str
    domain: str
    parent: str
    train_synonyms: tuple[str, ...] = ()
    heldout_synonyms: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        """Every word that names this concept: the name, then training and held-out synonyms."""
        return (self.name, *self.train_synonyms, *self.heldout_synonyms)


def _c(name, domain, parent, train, heldout):
    return Concept(name, domain, parent, tuple(train), tuple(heldout))


# Order within a domain is the class index used by the judge; never reorder, only append.
# The first training synonym is the one shapes-t2i v1 was trained on (language "v1"); v2 knows
# them all. No training synonym shares a stem with a held-out one ("gold" would leak "golden").
CONCEPTS: tuple[Concept, ...] = (
    # shapes
    _c("triangle", "shape", "polygon", ["trigon", "triangular shape", "three-cornered shape", "delta", "wedge",
                                        "pyramid shape"], ["three-sided figure"]),
    _c("square", "shape", "polygon", ["box", "block", "tile", "four-sided shape", "square shape",
                                      "equal-sided rectangle", "four-cornered shape"], ["quadrilateral"]),
    _c("pentagon", "shape", "polygon", ["five-sided polygon", "five-sided shape", "five-cornered shape",
                                        "house shape", "five-edged shape", "pentagon shape"], ["pentagonal figure"]),
    _c("circle", "shape", "round", ["disc", "disk", "round shape", "ball", "orb", "coin", "full moon"], ["round dot"]),
    _c("ellipse", "shape", "round", ["oval", "ovoid", "elongated circle", "flattened circle", "elliptical shape",
                                     "stretched circle", "oblong"], ["egg shape"]),
    _c("ring", "shape", "round", ["donut", "doughnut", "annulus", "loop", "halo", "hollow circle", "circlet"], ["hoop"]),
    _c("star", "shape", "pointed", ["five-pointed star", "star shape", "pentagram", "pointed star", "little star",
                                    "starburst"], ["asterism"]),
    _c("cross", "shape", "pointed", ["plus sign", "plus", "plus symbol", "cross shape", "swiss cross", "greek cross"],
       ["crucifix"]),
    _c("heart", "shape", "pointed", ["love heart", "heart shape", "love symbol", "heart symbol", "cardioid",
                                     "sweetheart"], ["valentine"]),
    # colours
    _c("red", "colour", "warm", ["scarlet", "cherry", "ruby", "vermilion", "blood-red", "cardinal", "maroon",
                                 "burgundy", "tomato", "brick red"], ["crimson"]),
    _c("orange", "colour", "warm", ["tangerine", "pumpkin", "carrot", "mandarin", "apricot", "persimmon", "copper",
                                    "ochre", "saffron", "marmalade"], ["amber"]),
    _c("yellow", "colour", "warm", ["lemon", "canary", "mustard", "butter", "sunflower", "banana", "daffodil",
                                    "straw", "sunshine", "honey"], ["golden"]),
    _c("pink", "colour", "warm", ["rose", "blush", "salmon", "bubblegum", "flamingo", "pastel pink", "fuchsia",
                                  "coral", "raspberry", "cerise"], ["magenta"]),
    _c("green", "colour", "cool", ["emerald", "jade", "grass-green", "leaf-green", "forest-green", "verdant", "olive",
                                   "mint", "chartreuse", "moss"], ["lime"]),
    _c("cyan", "colour", "cool", ["turquoise", "teal", "blue-green", "seafoam", "greenish blue", "caribbean",
                                  "peacock", "lagoon", "ice blue"], ["aqua"]),
    _c("blue", "colour", "cool", ["azure", "cobalt", "sapphire", "cerulean", "royal blue", "ultramarine", "denim",
                                  "midnight", "ocean blue", "cornflower"], ["navy"]),
    _c("purple", "colour", "cool", ["violet", "plum", "grape", "amethyst", "orchid", "mulberry", "lilac", "mauve",
                                    "indigo", "eggplant"], ["lavender"]),
    # textures
    _c("solid", "texture", "plain", ["plain", "uniform", "unpatterned", "filled", "monochrome", "single-coloured",
                                     "block-coloured", "one-tone"], ["flat"]),
    _c("gradient", "texture", "plain", ["shaded", "ombre", "graded", "blended", "tonal", "soft-shaded", "graduated"],
       ["fading"]),
    _c("striped", "texture", "pattern", ["stripy", "lined", "pinstriped", "streaked", "barred", "zebra",
                                         "candy-striped"], ["banded"]),
    _c("dotted", "texture", "pattern", ["polka-dot", "speckled", "dotty", "freckled", "pointillist", "sprinkled",
                                        "stippled"], ["spotted"]),
    _c("checkered", "texture", "pattern", ["chequered", "checked", "gingham", "chessboard", "harlequin", "plaid"],
       ["checkerboard"]),
)

DOMAINS: tuple[str, ...] = ("shape", "colour", "texture")


@dataclass(frozen=True)
class Ontology:
    """Lookup over a set of concepts; validates that no word names two concepts."""

    concepts: tuple[Concept, ...] = CONCEPTS
    domains: tuple[str, ...] = DOMAINS
    _by_word: dict[str, Concept] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        by_word: dict[str, Concept] = {}
        for concept in self.concepts:
            if concept.domain not in self.domains:
                raise ValueError(f"Concept {concept.name!r} has unknown domain {concept.domain!r}; known: {self.domains}")
            for word in concept.words:
                if word in by_word:
                    raise ValueError(f"Word {word!r} names both {by_word[word].name!r} and {concept.name!r}.")
                by_word[word] = concept
        object.__setattr__(self, "_by_word", by_word)

    def in_domain(self, domain: str) -> tuple[Concept, ...]:
        if domain not in self.domains:
            raise ValueError(f"Unknown domain {domain!r}; known domains: {', '.join(self.domains)}")
        return tuple(c for c in self.concepts if c.domain == domain)

    def names(self, domain: str) -> tuple[str, ...]:
        return tuple(c.name for c in self.in_domain(domain))

    def index(self, name: str) -> int:
        """Class index of a concept within its domain (the judge's label)."""
        concept = self.get(name)
        return self.names(concept.domain).index(concept.name)

    @property
    def supertypes(self) -> dict[str, tuple[str, ...]]:
        groups: dict[str, list[str]] = {}
        for c in self.concepts:
            groups.setdefault(c.parent, []).append(c.name)
        return {k: tuple(v) for k, v in groups.items()}

    def get(self, word: str) -> Concept:
        """The concept a word names (name or any synonym); raises with suggestions if none."""
        concept = self._by_word.get(word.strip().lower())
        if concept is None:
            raise ValueError(self._unknown_message(word))
        return concept

    def resolve(self, term: str) -> tuple[Concept, ...]:
        """Concepts a request term denotes: a concept word, a supertype, or a combination
        of concept words from different domains (``"striped triangle"``)."""
        term = term.strip().lower()
        if term in self._by_word:
            return (self._by_word[term],)
        if term in self.supertypes:
            return tuple(self.get(n) for n in self.supertypes[term])
        parts = term.split()
        if len(parts) > 1 and all(p in self._by_word for p in parts):
            found = tuple(self._by_word[p] for p in parts)
            if len({c.domain for c in found}) != len(found):
                raise ValueError(f"{term!r} names two concepts of one domain; a combination takes one per domain.")
            return found
        raise ValueError(self._unknown_message(term))

    def _unknown_message(self, word: str) -> str:
        vocabulary = list(self._by_word) + list(self.supertypes)
        near = difflib.get_close_matches(word.strip().lower(), vocabulary, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        return f"Unknown concept {word!r}.{hint} Known concepts: {', '.join(c.name for c in self.concepts)}; supertypes: {', '.join(self.supertypes)}."


DEFAULT_ONTOLOGY = Ontology()
