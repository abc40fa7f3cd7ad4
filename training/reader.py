"""The default model's prompt reader: a small network that reads a prompt's text-encoder states and
says which scene it asks for — one shape, or two side by side or one above the other — in the
model's own terms.

The UNet draws one shape said in any phrasing well, but does not bind two objects' colours and
shapes to the right places. With the reader, the engine draws a two-object prompt as the model
draws best: the first shape alone at its place, then the second one inpainted in its half of the
image (``webui/builtin/layout.py``). The reader sees exactly what the UNet sees (the engine's
prompt embeddings: MiniLM's last hidden state and embedding layer side by side) and is trained only
on the training phrasings (:mod:`training.phrasing`); the held-out ones measure how well it reads
words it never saw.

Its outputs (:data:`HEADS`) are in spatial order, so a scene has one reading however it is said:
slot ``a`` is the only object, or the left (top) one of a pair; slot ``b`` the right (bottom) one.
The network and its labels are saved in the model folder's ``reader/`` (``config.json`` and
``model.safetensors``), loaded by :mod:`webui.engine.reader`; the captions the engine writes from a
reading (``webui.builtin.layout.captions_of``) are the caption template of
:meth:`training.shapes.Scene.caption` (tested to agree).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training import phrasing, shapes
from webui.engine.reader import PromptReader, save_reader

# what the reader says, head by head ("" in a reading: the head does not apply to this scene)
HEADS: dict[str, tuple[str, ...]] = {
    "count": ("one", "two"),
    "background": tuple(shapes.COLORS),
    "position": tuple(shapes.POSITIONS),  # one object only
    "axis": ("horizontal", "vertical"),  # two objects only: side by side, or one above the other
    **{f"{slot}_color": tuple(shapes.COLORS) for slot in "ab"},
    **{f"{slot}_shape": shapes.SHAPES for slot in "ab"},
    **{f"{slot}_size": tuple(shapes.SIZES) for slot in "ab"},
}
# the reader's own pair templates, beside the training phrasings': sentences in which the relation
# is said from the shape named second, pointing back at the first ("a blue square, and left of it a
# red circle"). The UNet's phrasings always say it from the shape named first, and a reader trained on
# those alone swaps the shapes of such sentences. None of their words is a held-out one (tested).
READER_PAIR_TEMPLATES: tuple[str, ...] = (
    "{second} {bg}. {first} sits {rel} it",
    "{bg_first}: first {second}, then {first} {rel} it",
    "{second}, and {rel} it {first}, {bg}",
    "we see {second}; {first} lies {rel} that shape. the background is {bg_color}",
)
READER_PAIR_SHARE = 0.3  # of the training split's free-phrasing pairs
# and its own forms of each relation, drawn beside the training phrasings' in half of its pairs: the
# relation's direction said with other words around it ("a bit left of", "on the upper side of"),
# so that the reader keys on the direction word rather than on the exact phrase. No held-out word
# here either (tested).
READER_RELATIONS: dict[str, tuple[str, ...]] = {
    "left of": ("more to the left of", "a bit left of", "toward the left of", "on the left side of"),
    "right of": ("more to the right of", "a bit right of", "toward the right of", "on the right side of"),
    "above": ("on the upper side of", "a bit above", "atop", "just over"),
    "below": ("on the lower side of", "a bit below", "just under", "lower, beneath"),
}
READER_RELATION_SHARE = 0.5
# words a person adds that say nothing about the scene; a quarter of the reader's training captions
# get one or two of them at random places, so that a word it never saw does not change its reading
# (a held-out phrasing is mostly known words around a few new ones)
FILLERS: tuple[str, ...] = (
    "just", "really", "quite", "clearly", "nicely", "simply", "here", "now", "please", "so", "also",
    "exactly", "roughly", "some", "drawn", "shown", "one", "neatly", "plain", "simple",
)  # fmt: skip
FILLER_SHARE = 0.25
PAIR_AXIS = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}


def labels_of(item: shapes.Scene | shapes.Pair) -> dict[str, str]:
    """The reading of a scene or pair: every head's label (``""`` where a head does not apply)."""
    if isinstance(item, shapes.Scene):
        return {
            "count": "one",
            "background": item.background,
            "position": item.position,
            "axis": "",
            **_slot("a", item),
            **{f"b_{name}": "" for name in ("color", "shape", "size")},
        }
    first_low = item.relation in ("left of", "above")  # the first object is the left or top one
    low, high = (item.first, item.second) if first_low else (item.second, item.first)
    return {
        "count": "two",
        "background": item.background,
        "position": "",
        "axis": PAIR_AXIS[item.relation],
        **_slot("a", low),
        **_slot("b", high),
    }


def _slot(name: str, scene: shapes.Scene) -> dict[str, str]:
    return {f"{name}_color": scene.color, f"{name}_shape": scene.shape, f"{name}_size": scene.size}


def reading_texts(count: int, rng: random.Random, split: str) -> tuple[list[str], list[dict[str, str]]]:
    """``count`` captions with their readings: half one shape, half pairs; in the training split a
    third in the caption template, a few misspelt and a quarter with filler words, in the held-out
    split all in held-out phrasings."""
    texts, readings = [], []
    for _ in range(count):
        item: shapes.Scene | shapes.Pair = (
            shapes.random_pair(rng) if rng.random() < 0.5 else shapes.random_scene(rng)
        )
        if split == "train" and rng.random() < 1 / 3:
            text = item.caption()
        elif isinstance(item, shapes.Pair):
            extra = split == "train" and rng.random() < READER_PAIR_SHARE
            more = split == "train" and rng.random() < READER_RELATION_SHARE
            text = phrasing.phrase_pair(
                item,
                rng,
                split=split,
                misspellings=0.03 if split == "train" else 0.0,
                templates=READER_PAIR_TEMPLATES if extra else (),
                relations=READER_RELATIONS if more else None,
            )
        else:
            text = phrasing.phrase(item, rng, split=split, misspellings=0.03 if split == "train" else 0.0)
        if split == "train" and rng.random() < FILLER_SHARE:
            text = with_fillers(text, rng)
        texts.append(text)
        readings.append(labels_of(item))
    return texts, readings


def with_fillers(text: str, rng: random.Random) -> str:
    """``text`` with one or two :data:`FILLERS` put between its words."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randint(0, len(words)), rng.choice(FILLERS))
    return " ".join(words)


def label_tensor(readings: list[dict[str, str]]) -> torch.Tensor:
    """(N, len(HEADS)) class indices, -1 where a head does not apply."""
    rows = [[labels.index(r[head]) if r[head] else -1 for head, labels in HEADS.items()] for r in readings]
    return torch.tensor(rows, dtype=torch.long)


def encode(texts: list[str], text_states: tuple[int, ...] | None = (-1, 0), chunk: int = 256) -> torch.Tensor:
    """The engine's prompt embeddings of ``texts`` (N, 32, 384 per MiniLM state), as a model
    conditioned on ``text_states`` (the shipped model's: the last and the embedding layer) reads them."""
    from training.train import CaptionCache, text_bundle

    bundle = text_bundle(text_states)
    cache = CaptionCache(bundle, torch.device("cpu"), limit=chunk)
    with torch.no_grad():
        return torch.cat([cache(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])


def accuracy(reader: PromptReader, embeds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Per head (where it applies) and ``all``: every applicable head right."""
    reader.eval()
    with torch.no_grad():
        logits = reader(embeds)
    right = torch.ones(len(targets), dtype=torch.bool)
    scores = {}
    for k, (head, out) in enumerate(zip(HEADS, logits, strict=True)):
        applies = targets[:, k] >= 0
        hit = out.argmax(-1) == targets[:, k]
        scores[head] = float(hit[applies].float().mean()) if applies.any() else float("nan")
        right &= hit | ~applies
    scores["all"] = float(right.float().mean())
    two = targets[:, 0] == list(HEADS["count"]).index("two")
    scores["all_one"], scores["all_two"] = float(right[~two].float().mean()), float(right[two].float().mean())
    return scores


def train_reader(
    out: Path,
    *,
    seed: int = 0,
    texts: int = 12_000,
    steps: int = 3_000,
    batch: int = 128,
    lr: float = 1e-3,
    held_out: int = 2_000,
    text_states: tuple[int, ...] | None = (-1, 0),
    log: Any = print,
) -> dict[str, Any]:
    """Train the reader on ``texts`` training-phrasing captions, score it on ``held_out`` captions
    in the held-out phrasings, save it to ``out`` and return the scores."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    train_texts, train_readings = reading_texts(texts, random.Random(seed), "train")
    test_texts, test_readings = reading_texts(held_out, random.Random(seed + 10_007), "held_out")
    x, y = encode(train_texts, text_states), label_tensor(train_readings)
    x_test, y_test = encode(test_texts, text_states), label_tensor(test_readings)
    log(f"reader: encoded {len(x) + len(x_test)} captions in {time.perf_counter() - started:.0f} s")
    reader = PromptReader(HEADS, features=x.shape[-1])
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        reader.train()
        index = torch.randint(0, len(x), (batch,), generator=gen)
        inputs = x[index]
        inputs = inputs + 0.05 * inputs.std() * torch.randn(inputs.shape, generator=gen)  # a little noise
        loss = sum(F.cross_entropy(out, y[index, k], ignore_index=-1) for k, out in enumerate(reader(inputs)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"reader step {step}: loss {float(loss.detach()):.4f}")
    scores = {
        "train": accuracy(reader, x[:2000], y[:2000]),
        "held_out": accuracy(reader, x_test, y_test),
        "seconds": round(time.perf_counter() - started, 1),
        "recipe": {"seed": seed, "texts": texts, "steps": steps, "batch": batch, "lr": lr},
    }
    save_reader(reader.eval(), out, scores)
    return scores


if __name__ == "__main__":  # python -m training.reader MODEL_FOLDER/reader: the reader alone
    import sys

    result = train_reader(Path(sys.argv[1]))
    print(json.dumps(result, indent=2, default=lambda v: round(float(v), 4)))
