"""The default model's captions in many phrasings (training/phrasing.py): every fact said in every
phrasing, the evaluation's held-out templates and words never in training, reproducible."""

from __future__ import annotations

import random
import re

import pytest

from training.phrasing import HELD_OUT, TRAIN, misspell, phrase
from training.shapes import POSITIONS, SIZES, random_scene


def scenes(count: int, seed: int = 7):
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def words_of(phrasings) -> set[str]:
    """Every word phrase of a split (sizes, positions, background phrases without the colour)."""
    found = {word for forms in phrasings.sizes.values() for word in forms}
    found |= {phrase for forms in phrasings.positions.values() for phrase in forms}
    found |= {form.replace("{ac}", "").replace("{c}", "").strip() for form in phrasings.backgrounds}
    found |= {form.replace("{ac}", "").replace("{c}", "").strip() for form in phrasings.backgrounds_first}
    return found


def skeleton(template: str) -> str:
    """A template's own words, the slots taken out."""
    return " ".join(re.sub(r"\{[a-z_]+\}", " ", template).replace(",", " ").split())


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_every_caption_says_every_fact(split):
    words = TRAIN if split == "train" else HELD_OUT
    rng = random.Random(3)
    for scene in scenes(400):
        text = phrase(scene, rng, split=split)
        assert scene.color in text and scene.shape in text and scene.background in text, text
        assert any(re.search(rf"\b{re.escape(word)}\b", text) for word in words.sizes[scene.size]), text
        assert any(form in text for form in words.positions[scene.position]), text
        assert "  " not in text and text == text.strip()


def test_the_held_out_templates_and_words_are_never_in_training():
    assert set(TRAIN.sizes) == set(HELD_OUT.sizes) == set(SIZES)
    assert set(TRAIN.positions) == set(HELD_OUT.positions) == set(POSITIONS)
    assert not words_of(TRAIN) & words_of(HELD_OUT)
    held_out_words = {word for forms in HELD_OUT.sizes.values() for word in forms}
    held_out_phrases = {p for forms in HELD_OUT.positions.values() for p in forms}
    held_out_skeletons = {skeleton(t) for t in HELD_OUT.templates} - {""}
    assert not held_out_skeletons & {skeleton(t) for t in TRAIN.templates}
    rng = random.Random(5)
    for scene in scenes(2000, seed=11):
        text = phrase(scene, rng, misspellings=0.05)
        tokens = set(re.findall(r"[a-z-]+", text))
        assert not tokens & held_out_words, text
        assert not any(p in text for p in held_out_phrases), text
        assert not any(f" {s} " in f" {text} " for s in ("that is", "there is", "placed", "backdrop")), text


def test_the_same_seed_gives_the_same_captions_and_phrasings_vary():
    def run(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [phrase(scene, rng, misspellings=0.05) for scene in scenes(200)]

    assert run(1) == run(1) and run(1) != run(2)
    scene, rng = scenes(1)[0], random.Random(9)
    assert len({phrase(scene, rng) for _ in range(500)}) > 100  # one scene, many phrasings
    with pytest.raises(ValueError, match="split must be"):
        phrase(scene, rng, split="test")


def test_a_misspelling_changes_one_long_word_by_one_letter():
    rng = random.Random(4)
    text = "a small red circle at the top left on a blue background"
    for _ in range(200):
        wrong = misspell(text, rng)
        changed = [(a, b) for a, b in zip(text.split(), wrong.split(), strict=True) if a != b]
        assert len(changed) == 1
        before, after = changed[0]
        assert len(before) >= 4
        if len(before) == len(after):  # two neighbouring letters swapped
            moved = [i for i, (x, y) in enumerate(zip(before, after, strict=True)) if x != y]
            assert len(moved) == 2 and moved[1] == moved[0] + 1 and sorted(before) == sorted(after)
        else:  # one letter dropped or doubled
            assert abs(len(before) - len(after)) == 1
    assert misspell("a red sun", rng) == "a red sun"  # no word long enough


# -- two objects ---------------------------------------------------------------------------------

from training.phrasing import phrase_pair  # noqa: E402
from training.shapes import COLORS, OPPOSITE, SHAPES, random_pair  # noqa: E402


def pairs(count: int, seed: int = 13):
    rng = random.Random(seed)
    return [random_pair(rng) for _ in range(count)]


def test_a_pair_puts_the_first_shape_where_its_relation_says_and_maps_both():
    import numpy as np

    for pair in pairs(200):
        image, labels = pair.render()
        (x1, y1, _), (x2, y2, _) = pair.first.geometry(), pair.second.geometry()
        dx, dy = x1 - x2, y1 - y2
        expected = {"left of": dx < -20, "right of": dx > 20, "above": dy < -20, "below": dy > 20}
        assert expected[pair.relation], (pair.relation, dx, dy)
        assert len({pair.background, pair.first.color, pair.second.color}) == 3
        pixels = np.asarray(image)
        for scene in (pair.first, pair.second):  # each shape's centre: its colour, its class
            cx, cy, _ = scene.geometry()
            assert tuple(pixels[int(cy), int(cx)]) == COLORS[scene.color]
            assert labels[int(cy), int(cx)] == 1 + SHAPES.index(scene.shape)
        assert set(np.unique(labels)) == {0} | {1 + SHAPES.index(s.shape) for s in (pair.first, pair.second)}
    assert pairs(50) == pairs(50)  # seeded
    assert {pair.relation for pair in pairs(200)} == set(OPPOSITE)


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_every_pair_caption_says_both_objects_and_the_relation(split):
    words = TRAIN if split == "train" else HELD_OUT
    rng = random.Random(17)
    for pair in pairs(300):
        text = phrase_pair(pair, rng, split=split)
        for scene in (pair.first, pair.second):
            assert f"{scene.color} {scene.shape}" in text, text
        assert pair.background in text
        # the relation follows the object it is said of: the first object ("A left of B"), or
        # the second with the opposite relation ("B right of A")
        said = [
            (text.index(f" {word} "), subject)
            for subject, relation in ((pair.first, pair.relation), (pair.second, OPPOSITE[pair.relation]))
            for word in words.relations[relation]
            if f" {word} " in text
        ]
        assert said, text
        at, subject = said[0]
        mentions = {scene: text.index(f"{scene.color} {scene.shape}") for scene in (pair.first, pair.second)}
        nearest = max((scene for scene in mentions if mentions[scene] < at), key=mentions.get)
        assert nearest == subject, text


def test_pair_phrasings_held_out_are_never_in_training():
    train = {w for forms in TRAIN.relations.values() for w in forms}
    held_out = {w for forms in HELD_OUT.relations.values() for w in forms}
    assert not train & held_out
    assert not {skeleton(t) for t in HELD_OUT.pair_templates} & {skeleton(t) for t in TRAIN.pair_templates}
    rng = random.Random(19)
    for pair in pairs(1000, seed=23):
        text = phrase_pair(pair, rng, misspellings=0.05)
        assert not any(word in text for word in held_out), text


# -- into training -------------------------------------------------------------------------------


def test_without_phrasings_the_training_captions_are_the_shipped_recipes():
    from training.phrasing import training_text
    from training.shapes import training_caption

    old, new = random.Random(29), random.Random(29)
    for scene in scenes(500, seed=31):
        assert training_text(scene, new) == training_caption(scene, old)
    assert old.random() == new.random()  # the same draws, so the same data after them


def test_training_captions_mix_free_phrasings_and_pairs():
    from training.phrasing import training_text

    rng = random.Random(37)
    singles = [training_text(scene, rng, phrasing_share=1.0) for scene in scenes(400)]
    assert 0.05 < singles.count("") / len(singles) < 0.15  # still empty for classifier-free guidance
    templated = {scene.caption() for scene in scenes(400)}
    assert sum(text in templated for text in singles) < 40  # free phrasings, not the template
    two = [training_text(pair, rng, phrasing_share=0.5) for pair in pairs(400)]
    assert all(" ".join(text.split()) == text for text in two)
    assert any(pair.caption() == text for pair, text in zip(pairs(400), two, strict=True))


def test_the_training_pool_keeps_the_shipped_scenes_and_adds_pairs():
    from training.shapes import Pair, Scene, random_scene
    from training.train import ScenePool

    plain = ScenePool(12, seed=3)
    assert plain.scenes == [random_scene(random.Random(3 * 1_000_003 + i)) for i in range(12)]
    mixed = ScenePool(40, seed=3, pair_share=0.5)
    kinds = [type(scene) for scene in mixed.scenes]
    assert Pair in kinds and Scene in kinds
    for scene, labels in zip(mixed.scenes, mixed.labels, strict=True):
        classes = set(labels.unique().tolist()) - {0}
        shapes = [scene.first, scene.second] if isinstance(scene, Pair) else [scene]
        assert classes == {1 + SHAPES.index(s.shape) for s in shapes}


def test_the_train_command_takes_the_shares_and_refuses_others(capsys):
    from webui.cli import build_parser

    args = build_parser().parse_args(["train", "--pair-share", "0.3", "--phrasing-share", "1"])
    assert (args.pair_share, args.phrasing_share) == (0.3, 1.0)
    for bad in ("2", "-0.1", "nan", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--pair-share", bad])
        assert "expected a number from 0 to 1" in capsys.readouterr().err


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_each_phrasing_states_exactly_its_scene(split):
    """Read back, every caption gives its scene: no phrasing is ambiguous or says a wrong fact."""
    import dataclasses

    from training.phrasing import read_caption

    rng = random.Random(41)
    for scene in scenes(1500, seed=43):
        text = phrase(scene, rng, split=split)
        assert read_caption(text) == dataclasses.replace(scene, jitter=(0, 0), size_jitter=0), text
    assert read_caption("a red circle") is None  # facts missing
    assert read_caption("") is None


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_each_pair_phrasing_reads_back_as_its_scene(split):
    """Read back, every two-object caption gives its objects and relation, said from either side."""
    from training.phrasing import read_pair_caption

    rng = random.Random(53)
    for pair in pairs(1500, seed=59):
        text = phrase_pair(pair, rng, split=split)
        read = read_pair_caption(text)
        assert read is not None, text
        facts = lambda scene: (scene.color, scene.shape, scene.size)  # noqa: E731
        same = (facts(read.first), facts(read.second), read.relation) == (
            facts(pair.first),
            facts(pair.second),
            pair.relation,
        )
        flipped = (facts(read.first), facts(read.second), read.relation) == (
            facts(pair.second),
            facts(pair.first),
            OPPOSITE[pair.relation],
        )
        assert (same or flipped) and read.background == pair.background, (text, read)
        image, _ = read.render()  # laid out as its relation says: the first object on that side
        (x1, y1, _), (x2, y2, _) = read.first.geometry(), read.second.geometry()
        expected = {"left of": x1 < x2, "right of": x1 > x2, "above": y1 < y2, "below": y1 > y2}
        assert expected[read.relation]
    assert read_pair_caption("a red circle left of a blue square") is None  # no sizes, no background
    assert read_pair_caption("a big red circle on a blue background") is None  # one object
    assert read_pair_caption("") is None


def test_the_example_prompts_are_whole_scenes_in_trained_phrasings():
    from training.phrasing import example_prompts, read_caption, read_pair_caption

    examples = example_prompts()
    pairs = [text for text in examples if read_pair_caption(text) is not None]
    assert len(pairs) == 2  # two shapes, drawn through the model's prompt reader
    assert all(read_caption(text) is not None for text in examples if text not in pairs), examples
    held_out_words = [w for forms in HELD_OUT.sizes.values() for w in forms] + ["backdrop", "there is"]
    assert not any(word in text for text in examples for word in held_out_words)
    assert len({text.split()[0] for text in examples}) >= 4  # not one sentence shape
