"""Scoring a model of the procedural scenes through the ordinary engine, task by task.

Every image is made by :meth:`webui.engine.pipeline.Engine.generate` from a plain
:class:`~webui.request.GenerationRequest` at 64x64, exactly as a user would ask for it, and read back
by the deterministic analyser of :mod:`training.analyse`. Each task draws its scenes from its own
stream, seeded from ``random.Random(seed)``; training pools seed every scene by its index instead,
so the evaluation's scenes are not the pools' (any scene may still occur by chance).

Tasks and their measures:

* **txt2img**: the prompt is the full caption. *Adherence* is the share of images whose object
  colour, shape, position and background all match the caption; each attribute's own share (and
  the size's) is reported too.
* **seg2img**: the segmentation map is the scene's class map in the palette colours, the prompt the
  caption without size and position. Score: mean IoU between the given class map and the one the
  analyser recovers (per image, the mean over the classes present in either map, background
  included; then averaged over images).
* **inpaint**: the image is the render of a scene A; a second scene B on the same background, at
  another position and placed exactly as its caption says (no jitter), is to be painted in. The
  mask is B's bounding box grown by 4 pixels, room for the jitter a model may add (pairs whose mask
  would touch A's object are redrawn, so the mask holds only background; about one pair in three
  fits, which favours small objects). The prompt is B's caption; the request uses strength 1,
  ``mask_blur=0`` and keeps unmasked pixels (the default). Measures: the PSNR of the unmasked
  region against the init image (capped at 99 dB, reported as identical when no pixel changed), and
  adherence in the mask. An image adheres when B's colour (the nearest named colour, per pixel)
  covers at least half of B's shape pixels, and the analyser, given the output with everything
  outside the mask replaced by the background colour, recognises B's shape there.
* **img2img**: the init image is a render; the prompt describes the same scene with another object
  colour. For each strength in :data:`STRENGTHS` (same scenes and seeds), the mean absolute pixel
  difference from the init image (0-255) and the share of images recoloured as asked. The result is
  *monotonic* when the difference rises with every step of strength. If ``steps`` is too few for
  the lowest strength to run a step, img2img uses the fewest steps that does (5 for 0.2).

* **phrased** and **held_out**: txt2img with the scene said in free phrasing (:mod:`training.phrasing`):
  the phrasings training used, and those kept out of training for the evaluation only. Measures as
  for txt2img.
* **pair_phrased** and **pair_held_out**: two shapes, one beside or above the other
  (:class:`~training.shapes.Pair`), said in the phrasings training used and in the held-out ones.
  :func:`~training.analyse.analyse_pair` reads the image; each object of the prompt is the
  image's object of its colour. *Adherence* (all facts): the background, both colours found (two
  objects), both shapes right and the relation right (the first object's anchor is left of, right
  of, above or below the second's, by the larger offset). Each fact's share, and the sizes', too.
* **pair_seg2img**: seg2img with a two-object class map (the prompt: the pair's caption template);
  mean IoU against the class map :func:`~training.analyse.analyse_pair` recovers.

Images are generated ``batch_size`` at a time: one scene per request, its images with seeds
``seed + k`` (so a task's image ``k`` uses seed ``seed + k`` throughout).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from training.analyse import analyse, analyse_pair, class_iou, nearest_color_map, relation
from training.phrasing import phrase, phrase_pair
from training.shapes import COLORS, Pair, Scene, class_map_image, random_pair, random_scene
from webui.errors import InvalidRequestError
from webui.request import GenerationRequest

EVAL_SIZE = 64
STRENGTHS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
TASK_ORDER: tuple[str, ...] = (
    "txt2img",
    "seg2img",
    "inpaint",
    "img2img",
    "phrased",
    "held_out",
    "pair_phrased",
    "pair_held_out",
    "pair_seg2img",
)
PSNR_CAP = 99.0
MASK_GROW = 4
TARGETS: dict[str, float] = {
    "adherence": 0.90,
    "miou": 0.90,
    "psnr": 40.0,
    "phrased": 0.95,  # adherence (all but the size), one object, in the phrasings training used
    "held_out": 0.85,  # ... in phrasings it never saw
    "pair_held_out": 0.60,  # adherence (all but the sizes), two objects, in phrasings it never saw
}
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "background", "size")
PAIR_ATTRIBUTES: tuple[str, ...] = ("colors", "shapes", "relation", "background", "sizes")
_ADHERENCE = ("color", "shape", "position", "background")
_COLOR_INDEX = {name: i for i, name in enumerate(COLORS)}


def evaluate(
    engine: Any,
    model: str | None,
    *,
    seed: int = 12345,
    n: int = 100,
    steps: int = 20,
    sampler: str = "DPM++ 2M Karras",
    cfg_scale: float | None = None,
    batch_size: int = 4,
    tasks: Sequence[str] = TASK_ORDER,
    progress: Callable[[str], None] | None = None,
    samples: list[Sample] | None = None,
) -> dict[str, Any]:
    """Score ``model`` (a name, folder or hub id; ``None`` = the engine's default) on ``n`` images
    per task (``ceil(n / 5)`` per strength for img2img). See the module docstring for the methods.

    Returns a JSON-ready dict: ``config``, one entry per task, ``targets`` (each headline measure
    with its target and whether it is met) and ``seconds``. ``samples``: a list that receives every
    text-to-image prompt's images with their verdicts (for :func:`sample_sheet`).
    """
    if n < 1:
        raise InvalidRequestError(f"n must be at least 1, got {n}")
    if batch_size < 1:
        raise InvalidRequestError(f"batch_size must be at least 1, got {batch_size}")
    unknown = [task for task in tasks if task not in TASK_ORDER]
    if unknown:
        raise InvalidRequestError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASK_ORDER)}")
    started = time.perf_counter()
    if cfg_scale is None:  # the model's recommended guidance, as a user gets it
        cfg_scale = engine.models.get(model).default_cfg_scale
    base = GenerationRequest(
        model=model,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=seed,
        width=EVAL_SIZE,
        height=EVAL_SIZE,
    )
    run = _Runner(engine, base, batch_size, progress, samples)
    master = random.Random(seed)
    # one stream of scenes per task, drawn in a fixed order, so a task's scenes do not depend on n
    streams = {task: random.Random(master.getrandbits(64)) for task in TASK_ORDER}
    scores: dict[str, Any] = {
        "config": {
            "model": model,
            "seed": seed,
            "n": n,
            "steps": steps,
            "sampler": sampler,
            "cfg_scale": cfg_scale,
            "batch_size": batch_size,
            "size": EVAL_SIZE,
        }
    }
    jobs = {
        "txt2img": _txt2img,
        "seg2img": _seg2img,
        "inpaint": _inpaint,
        "img2img": _img2img,
        "phrased": lambda run, rng, n: _txt2img(run, rng, n, split="train"),
        "held_out": lambda run, rng, n: _txt2img(run, rng, n, split="held_out"),
        "pair_phrased": lambda run, rng, n: _pair_txt2img(run, rng, n, split="train"),
        "pair_held_out": lambda run, rng, n: _pair_txt2img(run, rng, n, split="held_out"),
        "pair_seg2img": _pair_seg2img,
    }
    for task in TASK_ORDER:
        if task in tasks:
            run.task = task
            scores[task] = jobs[task](run, streams[task], n)
    scores["targets"] = _targets(scores)
    scores["seconds"] = round(time.perf_counter() - started, 2)
    return scores


# -- running requests ---------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One evaluated text-to-image image: its task, prompt, seed and whether it showed every fact."""

    task: str
    prompt: str
    seed: int
    image: Image.Image
    adherent: bool


class _Runner:
    def __init__(
        self,
        engine: Any,
        base: GenerationRequest,
        batch_size: int,
        progress: Callable[[str], None] | None,
        samples: list[Sample] | None = None,
    ) -> None:
        self.engine, self.base, self.batch_size, self.progress = engine, base, batch_size, progress
        self.samples, self.task = samples, ""

    def keep(self, prompt: str, index: int, image: Image.Image, adherent: bool) -> None:
        if self.samples is not None:
            self.samples.append(Sample(self.task, prompt, self.base.seed + index, image, adherent))

    def groups(self, count: int) -> Iterator[tuple[int, int]]:
        """(first image index, images) of each request for ``count`` images."""
        for first in range(0, count, self.batch_size):
            yield first, min(self.batch_size, count - first)

    def __call__(self, first: int, images: int, **fields: Any) -> list[Image.Image]:
        request = self.base.replace(seed=self.base.seed + first, batch_size=images, batch_count=1, **fields)
        if self.progress is not None:
            self.progress(f"{request.task}: images {first + 1}-{first + images}")
        result = self.engine.generate(request)
        return [item.image.convert("RGB") for item in result.images]


def _share(values: list[bool] | list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


# -- the tasks ----------------------------------------------------------------------------------


def _txt2img(run: _Runner, rng: random.Random, n: int, split: str | None = None) -> dict[str, Any]:
    """Adherence to the caption template, or (``split``) to free phrasings of the scene: "train"
    those training used, "held_out" those kept for the evaluation (:mod:`training.phrasing`)."""
    hits: dict[str, list[bool]] = {name: [] for name in (*ATTRIBUTES, "adherence", "found")}
    for first, count in run.groups(n):
        scene = random_scene(rng)
        prompt = scene.caption() if split is None else phrase(scene, rng, split=split)
        for k, image in enumerate(run(first, count, task="txt2img", prompt=prompt)):
            found = analyse(image)
            same = {name: getattr(found, name) == getattr(scene, name) for name in ATTRIBUTES}
            for name in ATTRIBUTES:
                hits[name].append(same[name])
            hits["adherence"].append(all(same[name] for name in _ADHERENCE))
            run.keep(prompt, first + k, image, hits["adherence"][-1])
            hits["found"].append(found.found)
    return {"images": n, **{name: _share(values) for name, values in hits.items()}}


def _seg2img(run: _Runner, rng: random.Random, n: int) -> dict[str, Any]:
    ious: list[float] = []
    shapes: list[bool] = []
    colors: list[bool] = []
    for first, count in run.groups(n):
        scene = random_scene(rng)
        _, labels = scene.render(EVAL_SIZE)
        prompt = scene.caption(with_size=False, with_position=False)
        for image in run(first, count, task="seg2img", prompt=prompt, seg_map=class_map_image(labels)):
            found = analyse(image)
            ious.append(class_iou(labels, found.class_map))
            shapes.append(found.shape == scene.shape)
            colors.append(found.color == scene.color)
    return {"images": n, "miou": _share(ious), "shape": _share(shapes), "color": _share(colors)}


def pair_facts(pair: Pair, image: Image.Image) -> dict[str, bool]:
    """Which facts of ``pair`` the image shows (see the module docstring): each object is the
    image's object of its colour."""
    read = analyse_pair(image)
    first, second = read.find(pair.first.color), read.find(pair.second.color)
    facts = {"background": read.background == pair.background, "two_objects": len(read.objects) == 2}
    if first is None or second is None or first is second:
        facts.update(colors=False, shapes=False, relation=False, sizes=False)
    else:
        facts.update(
            colors=True,
            shapes=(first.shape, second.shape) == (pair.first.shape, pair.second.shape),
            relation=relation(first, second) == pair.relation,
            sizes=(first.size, second.size) == (pair.first.size, pair.second.size),
        )
    facts["adherence"] = all(facts[name] for name in ("background", "colors", "shapes", "relation"))
    return facts


def _pair_txt2img(run: _Runner, rng: random.Random, n: int, split: str) -> dict[str, Any]:
    """Adherence to two-object prompts in the phrasings of ``split``."""
    hits: dict[str, list[bool]] = {name: [] for name in (*PAIR_ATTRIBUTES, "two_objects", "adherence")}
    for first, count in run.groups(n):
        pair = random_pair(rng)
        prompt = phrase_pair(pair, rng, split=split)
        for k, image in enumerate(run(first, count, task="txt2img", prompt=prompt)):
            for name, hit in pair_facts(pair, image).items():
                hits[name].append(hit)
            run.keep(prompt, first + k, image, hits["adherence"][-1])
    return {"images": n, **{name: _share(values) for name, values in hits.items()}}


def _pair_seg2img(run: _Runner, rng: random.Random, n: int) -> dict[str, Any]:
    ious: list[float] = []
    for first, count in run.groups(n):
        pair = random_pair(rng)
        _, labels = pair.render(EVAL_SIZE)
        for image in run(
            first, count, task="seg2img", prompt=pair.caption(), seg_map=class_map_image(labels)
        ):
            ious.append(class_iou(labels, analyse_pair(image).class_map))
    return {"images": n, "miou": _share(ious)}


def inpaint_pair(rng: random.Random) -> tuple[Scene, Scene, np.ndarray]:
    """Scenes A (the image) and B (what to paint in) and the (H, W) bool mask: B's bounding box
    grown by :data:`MASK_GROW` pixels, holding no pixel of A's object."""
    for _ in range(10_000):
        a, b = random_scene(rng), random_scene(rng)
        # B exactly where its caption puts it: a model cannot know a jitter the caption omits
        b = dataclasses.replace(b, background=a.background, jitter=(0, 0), size_jitter=0)
        if b.color == a.background or b.position == a.position:
            continue
        _, a_labels = a.render(EVAL_SIZE)
        _, b_labels = b.render(EVAL_SIZE)
        mask = _box_mask(b_labels > 0, MASK_GROW)
        if not (mask & (a_labels > 0)).any():
            return a, b, mask
    raise RuntimeError("no inpainting pair found")  # pragma: no cover - about one draw in three fits


def _box_mask(region: np.ndarray, grow: int) -> np.ndarray:
    ys, xs = np.nonzero(region)
    height, width = region.shape
    mask = np.zeros_like(region, dtype=bool)
    mask[
        max(ys.min() - grow, 0) : min(ys.max() + 1 + grow, height),
        max(xs.min() - grow, 0) : min(xs.max() + 1 + grow, width),
    ] = True
    return mask


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, 8-bit peak) between two pixel arrays of the same shape; :data:`PSNR_CAP` if equal."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(255.0**2 / mse))


def _inpaint(run: _Runner, rng: random.Random, n: int) -> dict[str, Any]:
    psnrs: list[float] = []
    identical: list[bool] = []
    coverage: list[float] = []
    shapes: list[bool] = []
    colors: list[bool] = []
    adherent: list[bool] = []
    for first, count in run.groups(n):
        a, b, mask = inpaint_pair(rng)
        init, _ = a.render(EVAL_SIZE)
        _, b_labels = b.render(EVAL_SIZE)
        b_pixels = b_labels > 0
        init_pixels = np.asarray(init)
        mask_image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L")
        images = run(
            first,
            count,
            task="inpaint",
            prompt=b.caption(),
            init_image=init,
            mask=mask_image,
            mask_blur=0,
            strength=1.0,
            keep_unmasked=True,
        )
        background = np.asarray(COLORS[b.background], dtype=np.uint8)
        for image in images:
            out = np.asarray(image)
            outside = ~mask
            identical.append(bool(np.array_equal(out[outside], init_pixels[outside])))
            psnrs.append(psnr(out[outside], init_pixels[outside]))
            named = nearest_color_map(out)
            cover = float((named[b_pixels] == _COLOR_INDEX[b.color]).mean())
            canvas = np.where(mask[..., None], out, background).astype(np.uint8)
            found = analyse(Image.fromarray(canvas))
            coverage.append(cover)
            shapes.append(found.shape == b.shape)
            colors.append(found.color == b.color)
            adherent.append(cover >= 0.5 and found.shape == b.shape)
    return {
        "images": n,
        "psnr_unmasked": _share(psnrs),
        "psnr_unmasked_min": float(min(psnrs)),
        "unmasked_identical": all(identical),
        "adherence": _share(adherent),
        "coverage": _share(coverage),
        "shape": _share(shapes),
        "color": _share(colors),
    }


def img2img_steps(steps: int, strength: float = min(STRENGTHS)) -> int:
    """The fewest steps, at least ``steps``, with which ``strength`` runs at least one step."""
    while int(steps * strength) < 1:
        steps += 1
    return steps


def _img2img(run: _Runner, rng: random.Random, n: int) -> dict[str, Any]:
    per_strength = math.ceil(n / len(STRENGTHS))
    steps = img2img_steps(run.base.steps)
    diffs: dict[float, list[float]] = {s: [] for s in STRENGTHS}
    recoloured: dict[float, list[bool]] = {s: [] for s in STRENGTHS}
    for first, count in run.groups(per_strength):
        scene = random_scene(rng)
        target = rng.choice([c for c in COLORS if c not in (scene.color, scene.background)])
        init, _ = scene.render(EVAL_SIZE)
        init_pixels = np.asarray(init, dtype=np.float64)
        prompt = dataclasses.replace(scene, color=target).caption()
        for strength in STRENGTHS:
            for image in run(
                first, count, task="img2img", prompt=prompt, init_image=init, strength=strength, steps=steps
            ):
                diffs[strength].append(
                    float(np.abs(np.asarray(image, dtype=np.float64) - init_pixels).mean())
                )
                recoloured[strength].append(analyse(image).color == target)
    means = [_share(diffs[s]) for s in STRENGTHS]
    return {
        "images": per_strength * len(STRENGTHS),
        "steps": steps,
        "strengths": list(STRENGTHS),
        "mean_abs_diff": means,
        "recoloured": [_share(recoloured[s]) for s in STRENGTHS],
        "monotonic": all(later > earlier for earlier, later in zip(means, means[1:], strict=False)),
    }


# -- reporting ----------------------------------------------------------------------------------


def _targets(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if "txt2img" in scores:
        value = scores["txt2img"]["adherence"]
        out["txt2img adherence"] = {
            "value": value,
            "target": TARGETS["adherence"],
            "met": value >= TARGETS["adherence"],
        }
    if "seg2img" in scores:
        value = scores["seg2img"]["miou"]
        out["seg2img miou"] = {"value": value, "target": TARGETS["miou"], "met": value >= TARGETS["miou"]}
    if "inpaint" in scores:
        value = scores["inpaint"]["psnr_unmasked"]
        out["inpaint psnr_unmasked"] = {
            "value": value,
            "target": TARGETS["psnr"],
            "met": value >= TARGETS["psnr"],
        }
    if "img2img" in scores:
        value = scores["img2img"]["monotonic"]
        out["img2img monotonic"] = {"value": value, "target": True, "met": bool(value)}
    if "pair_held_out" in scores:
        value = scores["pair_held_out"]["adherence"]
        out["pair_held_out adherence"] = {
            "value": value,
            "target": TARGETS["pair_held_out"],
            "met": value >= TARGETS["pair_held_out"],
        }
    for task in ("phrased", "held_out"):
        if task in scores:
            value = scores[task]["adherence"]
            out[f"{task} adherence"] = {
                "value": value,
                "target": TARGETS[task],
                "met": value >= TARGETS[task],
            }
    return out


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def format_table(scores: dict[str, Any]) -> str:
    """The scores as a Markdown table: ``| task | metric | value | target |``."""
    rows: list[tuple[str, str, str, str]] = []
    t2i = scores.get("txt2img")
    if t2i:
        rows.append(
            (
                "txt2img",
                "adherence (colour, shape, position, background)",
                _pct(t2i["adherence"]),
                f"≥ {TARGETS['adherence'] * 100:.0f} %",
            )
        )
        for name in ATTRIBUTES:
            rows.append(("txt2img", f"{name} correct", _pct(t2i[name]), ""))
    seg = scores.get("seg2img")
    if seg:
        rows.append(
            (
                "seg2img",
                "mean IoU (given vs recovered class map)",
                f"{seg['miou']:.3f}",
                f"≥ {TARGETS['miou']:.2f}",
            )
        )
        rows.append(("seg2img", "shape correct", _pct(seg["shape"]), ""))
        rows.append(("seg2img", "colour correct", _pct(seg["color"]), ""))
    inp = scores.get("inpaint")
    if inp:
        value = f"{inp['psnr_unmasked']:.2f} dB"
        if inp["unmasked_identical"]:
            value = f"{PSNR_CAP:.0f} dB (identical)"
        rows.append(("inpaint", "PSNR of the unmasked region", value, f"≥ {TARGETS['psnr']:.0f} dB"))
        rows.append(
            (
                "inpaint",
                "adherence (colour on ≥ 50 % of the shape, shape recognised)",
                _pct(inp["adherence"]),
                "",
            )
        )
        rows.append(("inpaint", "colour coverage of the new shape", _pct(inp["coverage"]), ""))
    i2i = scores.get("img2img")
    if i2i:
        diffs = " / ".join(f"{d:.1f}" for d in i2i["mean_abs_diff"])
        strengths = " / ".join(f"{s:g}" for s in i2i["strengths"])
        rows.append(("img2img", f"mean abs difference from init at strength {strengths}", diffs, "rising"))
        recol = " / ".join(f"{100 * r:.0f}" for r in i2i["recoloured"])
        rows.append(("img2img", f"recoloured as asked at strength {strengths} (%)", recol, ""))
        rows.append(("img2img", "monotonic", "yes" if i2i["monotonic"] else "no", "yes"))
    for task, words in (
        ("phrased", "phrasings training used"),
        ("held_out", "phrasings held out of training"),
    ):
        scored = scores.get(task)
        if scored:
            rows.append(
                (
                    task,
                    f"adherence (colour, shape, position, background), {words}",
                    _pct(scored["adherence"]),
                    f"≥ {TARGETS[task] * 100:.0f} %",
                )
            )
            for name in ATTRIBUTES:
                rows.append((task, f"{name} correct", _pct(scored[name]), ""))
    for task, words in (
        ("pair_phrased", "phrasings training used"),
        ("pair_held_out", "phrasings held out of training"),
    ):
        scored = scores.get(task)
        if scored:
            target = f"≥ {TARGETS[task] * 100:.0f} %" if task in TARGETS else ""
            rows.append(
                (
                    task,
                    f"adherence (colours, shapes, relation, background), {words}",
                    _pct(scored["adherence"]),
                    target,
                )
            )
            for name in (*PAIR_ATTRIBUTES, "two_objects"):
                rows.append((task, f"{name.replace('_', ' ')} correct", _pct(scored[name]), ""))
    pair_seg = scores.get("pair_seg2img")
    if pair_seg:
        rows.append(("pair_seg2img", "mean IoU, two-object class maps", f"{pair_seg['miou']:.3f}", ""))
    lines = ["| task | metric | value | target |", "| --- | --- | --- | --- |"]
    lines += [f"| {task} | {metric} | {value} | {target} |" for task, metric, value, target in rows]
    return "\n".join(lines)


def sample_sheet(samples: Sequence[Sample], *, columns: int = 4, scale: int = 2) -> Image.Image:
    """A sheet of evaluated images, ``scale`` times enlarged (nearest neighbour), each with its prompt
    and seed beneath and a green (every fact shown) or red (not) frame."""
    from PIL import ImageDraw, ImageFont

    if not samples:
        raise InvalidRequestError("no samples to draw")
    font = ImageFont.load_default(11)
    side = EVAL_SIZE * scale
    cell_w, text_h, pad = max(side, 200), 44, 8
    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for index, sample in enumerate(samples):
        x = pad + (index % columns) * (cell_w + pad)
        y = pad + (index // columns) * (side + text_h + pad)
        frame = (40, 160, 60) if sample.adherent else (200, 40, 40)
        draw.rectangle((x - 3, y - 3, x + side + 2, y + side + 2), outline=frame, width=3)
        sheet.paste(sample.image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        lines = _wrap(f"{sample.prompt} (seed {sample.seed})", font, cell_w, draw)[:3]
        draw.multiline_text((x, y + side + 4), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    return sheet


def _wrap(text: str, font: Any, width: int, draw: Any) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
