"""Captions of one scene in many phrasings: the default model learns which word describes what,
not where words sit in one sentence shape.

A caption is a **template** (the order of the parts, commas or none, "the background is ...") filled
with **words** for each fact: several for a size ("big", "huge"), a position ("upper left corner",
"in the middle"), the background ("on a blue background", "blue backdrop"). Some templates and words
are **held out**: :func:`phrase` uses them only with ``split="held_out"``, which the evaluation asks
for, never training, so the evaluation measures phrasings the model never saw. Training captions
also drop the article now and then and misspell a word in a few percent of captions.

Everything is drawn from the ``random.Random`` given, so a data set stays reproducible.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from training.shapes import COLORS, OPPOSITE, POSITIONS, SHAPES, Pair, Scene, training_caption

__all__ = [
    "HELD_OUT",
    "TRAIN",
    "Phrasings",
    "example_prompts",
    "misspell",
    "phrase",
    "phrase_pair",
    "read_caption",
    "read_pair_caption",
    "training_text",
]

SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class Phrasings:
    """The templates and words of one split. A template's slots: ``{a}`` (an article or nothing),
    ``{size}``, ``{color}``, ``{shape}``, ``{where}`` (a position phrase), ``{bg}`` (a background
    phrase that reads after the object), ``{bg_first}`` (one that reads first), ``{bg_color}``."""

    templates: tuple[str, ...]
    sizes: dict[str, tuple[str, ...]]
    positions: dict[str, tuple[str, ...]]
    backgrounds: tuple[str, ...]  # after the object: "on a {color} background"
    backgrounds_first: tuple[str, ...]  # before it: "{color} background"
    # two objects: ``{first}``, ``{second}`` (each "{a}{size} {color} {shape}"), ``{rel}`` (the
    # first's relation to the second), ``{rel_back}`` (the second's to the first), ``{bg}``...
    pair_templates: tuple[str, ...] = ()
    relations: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _positions(corner: str, side: str, middle: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Position phrases for the nine places: corners ("{v} {h}"), sides, the middle."""
    phrases: dict[str, tuple[str, ...]] = {}
    for name in POSITIONS:
        if name == "center":
            phrases[name] = middle
        elif " " in name:
            vertical, horizontal = name.split()
            upper = {"top": "upper", "bottom": "lower"}[vertical]
            phrases[name] = tuple(
                form.format(v=vertical, h=horizontal, upper=upper) for form in corner.split("|")
            )
        else:
            phrases[name] = tuple(form.format(s=name) for form in side.split("|"))
    return phrases


TRAIN = Phrasings(
    templates=(
        "{a}{size} {color} {shape} {where} {bg}",
        "{a}{color} {shape}, {size}, {where}, {bg}",
        "{bg_first}, {a}{size} {color} {shape} {where}",
        "{a}{size} {color} {shape} {where}. the background is {bg_color}",
        "{where}: {a}{size} {color} {shape}, {bg}",
        "{size} {color} {shape} {where} {bg}",
        "{bg_first} with {a}{size} {color} {shape} {where}",
        "{a}{size} {shape} in {color} {where} {bg}",
    ),
    sizes={"small": ("small", "little", "smallish"), "large": ("large", "big", "large-sized")},
    positions=_positions(
        "at the {v} {h}|in the {v} {h} corner|{v} {h}|{v}-{h}|in the {upper} {h}",
        "at the {s}|on the {s}|{s} side|to the {s}",
        ("in the center", "in the middle", "centered", "center"),
    ),
    backgrounds=("on {ac} background", "on {c}", "against {ac} background", "with {ac} background"),
    backgrounds_first=("{c} background", "{ac} background", "all {c} behind"),
    pair_templates=(
        "{first} {rel} {second} {bg}",
        "{bg_first}, {first} {rel} {second}",
        "{second} {rel_back} {first}, {bg}",
        "{first} {rel} {second}. the background is {bg_color}",
    ),
    relations={
        "left of": ("to the left of", "left of", "on the left of"),
        "right of": ("to the right of", "right of", "on the right of"),
        "above": ("above", "over", "on top of"),
        "below": ("below", "under", "beneath"),
    },
)

HELD_OUT = Phrasings(  # the evaluation's only: no template or word here is used in training
    templates=(
        "{bg_first} and {a}{size} {color} {shape} {where}",
        "{a}{color} {shape} that is {size}, placed {where}, {bg}",
        "{where} there is {a}{size} {color} {shape}; {bg}",
    ),
    sizes={"small": ("tiny", "miniature"), "large": ("huge", "giant")},
    positions=_positions(
        "in the {upper} {h} corner|{upper} {h} area",
        "at the {s} edge|in the {s} part",
        ("in the very middle", "in the exact center"),
    ),
    backgrounds=("on {ac} backdrop", "with {c} all around"),
    backgrounds_first=("{c} backdrop", "{c} surroundings"),
    pair_templates=(
        "{bg_first} and {first} {rel} {second}",
        "there is {second}, and {first} is {rel} it; {bg}",
    ),
    relations={
        "left of": ("further left than", "at the left-hand side of"),
        "right of": ("further right than", "at the right-hand side of"),
        "above": ("higher up than", "up above"),
        "below": ("lower down than", "underneath"),
    },
)


# the web app's example prompts: the caption template and free phrasings, each a caption training
# uses (read back exactly by read_caption or read_pair_caption; checked by the tests, which also
# check that the shipped model draws them), two of them with two shapes (drawn through the prompt
# reader, see docs/default-model.md).
EXAMPLES: tuple[str, ...] = (
    "a large red circle in the center on a white background",
    "blue background, big red circle in the upper left corner",
    "a little green triangle at the bottom right. the background is purple",
    "orange circle, small, to the left, against a gray background",
    "in the top right corner: a big white square, on a black background",
    "gray background with a large-sized blue triangle at the top",
    "green background, a big yellow triangle above a small purple circle",
    "a little white circle right of a large orange square. the background is blue",
)


def example_prompts() -> list[str]:
    """The prompts the web app offers to try with the default model (``ui.examples``)."""
    return list(EXAMPLES)


def _split(split: str) -> Phrasings:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return TRAIN if split == "train" else HELD_OUT


def phrase(scene: Scene, rng: random.Random, *, split: str = "train", misspellings: float = 0.0) -> str:
    """One caption of ``scene`` in a phrasing of ``split`` ("train" or "held_out"): every fact
    (size, colour, shape, position, background) said once. ``misspellings``: the chance that one
    word of the caption is misspelt (training uses a few percent; the evaluation none)."""
    words = _split(split)
    template = rng.choice(words.templates)
    size = rng.choice(words.sizes[scene.size])
    text = template.format(
        a="" if rng.random() < 0.3 else _article(size),  # no article now and then
        size=size,
        color=scene.color,
        shape=scene.shape,
        where=rng.choice(words.positions[scene.position]),
        **_background_words(words, scene.background, rng),
    )
    return _finished(text, rng, misspellings)


def phrase_pair(
    pair: Pair,
    rng: random.Random,
    *,
    split: str = "train",
    misspellings: float = 0.0,
    templates: tuple[str, ...] = (),
    relations: Mapping[str, tuple[str, ...]] | None = None,
) -> str:
    """One caption of a two-object ``pair`` in a phrasing of ``split``: both objects with their
    size, colour and shape, the relation (said from either object), the background. ``templates``:
    pair templates to draw from instead of the split's own (with the split's words); ``relations``:
    more forms of each relation, drawn from beside the split's own."""
    words = _split(split)
    forms = {name: (*own, *(relations or {}).get(name, ())) for name, own in words.relations.items()}

    def thing(scene: Scene) -> str:
        size = rng.choice(words.sizes[scene.size])
        return f"{'' if rng.random() < 0.2 else _article(size)}{size} {scene.color} {scene.shape}"

    text = rng.choice(templates or words.pair_templates).format(
        first=thing(pair.first),
        second=thing(pair.second),
        rel=rng.choice(forms[pair.relation]),
        rel_back=rng.choice(forms[OPPOSITE[pair.relation]]),
        **_background_words(words, pair.background, rng),
    )
    return _finished(text, rng, misspellings)


def _background_words(words: Phrasings, color: str, rng: random.Random) -> dict[str, str]:
    """The background slots of a template: a phrase after the object, one before it, the colour."""
    forms = {"c": color, "ac": _article(color) + color}
    return {
        "bg": rng.choice(words.backgrounds).format(**forms),
        "bg_first": rng.choice(words.backgrounds_first).format(**forms),
        "bg_color": color,
    }


def _finished(text: str, rng: random.Random, misspellings: float) -> str:
    """Single spaces, and one word misspelt with chance ``misspellings``."""
    text = " ".join(text.split())
    if misspellings and rng.random() < misspellings:
        text = misspell(text, rng)
    return text


def training_text(
    item: Scene | Pair, rng: random.Random, *, phrasing_share: float = 0.0, misspellings: float = 0.03
) -> str:
    """A training caption of a scene or pair: empty 10 % of the time (for classifier-free
    guidance), else in free phrasing with chance ``phrasing_share`` (a few percent misspelt), else
    the caption template (a single scene's with parts left out now and then). With
    ``phrasing_share`` 0 it draws exactly what :func:`training.shapes.training_caption` draws."""
    if isinstance(item, Pair):
        if rng.random() < 0.1:
            return ""
        if phrasing_share and rng.random() < phrasing_share:
            return phrase_pair(item, rng, misspellings=misspellings)
        return item.caption(with_background=rng.random() > 0.1)
    if phrasing_share and rng.random() < phrasing_share:
        return "" if rng.random() < 0.1 else phrase(item, rng, misspellings=misspellings)
    return training_caption(item, rng)


def _take_background(text: str) -> tuple[str, str | None]:
    """``text`` without its background phrase (of either split), and the background colour."""
    colors = "|".join(COLORS)
    forms = [
        form
        for words in (TRAIN, HELD_OUT)
        for form in (*words.backgrounds, *words.backgrounds_first, "the background is {c}")
    ]
    for form in sorted(forms, key=len, reverse=True):
        pattern = (
            re.escape(form)
            .replace(r"\{ac\}", rf"an?\ (?P<c>{colors})")
            .replace(r"\{c\}", rf"(?P<c>{colors})")
        )
        found = re.search(rf"(?:^|\b){pattern}(?:\b|$)", text)
        if found:
            return text[: found.start()] + " " + text[found.end() :], found.group("c")
    return text, None


def _size_words() -> dict[str, str]:
    return {
        word: name for words in (TRAIN, HELD_OUT) for name, forms in words.sizes.items() for word in forms
    }


def read_pair_caption(text: str) -> Pair | None:
    """The two-object scene a caption of :func:`phrase_pair` states (either split; not misspelt),
    laid out in the middle row or column, or None when it does not state every fact. The relation's
    subject is the object said just before the relation words, whichever template put it there."""
    rest, background = _take_background(text)
    relations = sorted(
        (
            (form, name)
            for words in (TRAIN, HELD_OUT)
            for name, forms in words.relations.items()
            for form in forms
        ),
        key=lambda item: len(item[0]),
        reverse=True,
    )
    sizes = _size_words()
    pattern = (
        rf"(?P<size>{'|'.join(map(re.escape, sorted(sizes, key=len, reverse=True)))})\s+"
        rf"(?P<color>{'|'.join(COLORS)})\s+(?P<shape>{'|'.join(SHAPES)})\b"
    )
    things = list(re.finditer(pattern, rest))
    for form, name in relations:
        found = re.search(rf"(?:^|\s){re.escape(form)}(?:\s|$)", rest)
        if found is None:
            continue
        if len(things) != 2 or background is None:
            return None
        before = [thing for thing in things if thing.end() <= found.start()]
        if not before:
            return None
        subject = before[-1]
        other = things[0] if subject is things[1] else things[1]
        places = {"left of": ("left", "right"), "above": ("top", "bottom")}
        first_place, second_place = places.get(name) or places[OPPOSITE[name]][::-1]
        first, second = (
            Scene(
                shape=thing["shape"],
                color=thing["color"],
                size=sizes[thing["size"]],
                position=place,
                background=background,
            )
            for thing, place in ((subject, first_place), (other, second_place))
        )
        return Pair(first, second, name)
    return None


def read_caption(text: str) -> Scene | None:
    """The scene a one-object caption of :func:`phrase` states (either split; not misspelt), or
    None when it does not state every fact: the inverse of :func:`phrase`, used to check that every
    phrasing says exactly its scene and by stand-in engines in the evaluation's tests."""
    rest, background = _take_background(text)
    sizes = _size_words()
    places = sorted(
        (
            (form, name)
            for words in (TRAIN, HELD_OUT)
            for name, forms in words.positions.items()
            for form in forms
        ),
        key=lambda item: len(item[0]),
        reverse=True,
    )
    position = next(
        (name for form, name in places if re.search(rf"(?:^|[\s,:]){re.escape(form)}(?:$|[\s,.;:])", rest)),
        None,
    )
    tokens = re.findall(r"[a-z-]+", rest)
    color = next((word for word in tokens if word in COLORS), None)
    shape = next((word for word in tokens if word in SHAPES), None)
    size = next((sizes[word] for word in tokens if word in sizes), None)
    if None in (background, position, color, shape, size):
        return None
    return Scene(
        shape=str(shape), color=str(color), size=str(size), position=str(position), background=str(background)
    )


def misspell(text: str, rng: random.Random) -> str:
    """``text`` with one word of four letters or more misspelt: two neighbouring letters swapped,
    or one letter dropped or doubled (doubled where a swap would change nothing)."""
    words = text.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 4 and word.isalpha()]
    if not candidates:
        return text
    index = rng.choice(candidates)
    word = words[index]
    at = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0 and word[at] != word[at + 1]:  # a swap of two different letters
        word = word[:at] + word[at + 1] + word[at] + word[at + 2 :]
    elif kind == 1:
        word = word[:at] + word[at + 1 :]
    else:
        word = word[:at] + word[at] + word[at:]
    words[index] = word
    return " ".join(words)


def _article(word: str) -> str:
    """The indefinite article before ``word``, with its space."""
    return "an " if word[0] in "aeiou" else "a "
