"""The X/Y/Z plot: axis values (ranges, lists, choices, bad values, limits) parsed before anything
runs; a plot's cells equal the single generations with the same parameters; the grid is the cells
under drawn labels, saved with a ``parameters`` text; each image keeps its own infotext; interrupt
and skip keep what is done; a plugin's field is an axis with no plot code; the web app, the command
line and the HTTP API run plots."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from webui import plot
from webui.api import hookimpl
from webui.engine.control import GenerationControl
from webui.errors import InvalidRequestError
from webui.fields import FieldRegistry
from webui.limits import LimitExceeded, Limits
from webui.metadata import parse_infotext, read_png_parameters
from webui.testing import TASK_DEFAULTS, make_engine

pytestmark = pytest.mark.slow  # model runs and many generations: left out of the quick run

SIZE = 64
PROMPT = "a red cat on a blue mat"


class Boost:
    """A community plugin's float field (and a switch to skip or interrupt from a step)."""

    def __init__(self) -> None:
        self.seen: list[float] = []
        self.skip_steps: int | None = None  # skip the batch of a request with this many steps

    @hookimpl
    def register_fields(self, register):
        register(
            "detail_boost",
            "float",
            default=0.0,
            minimum=0.0,
            maximum=2.0,
            step=0.1,
            label="Detail boost",
            infotext="Detail boost",
        )
        register("tone", "choice", default="warm", choices=("warm", "cold"), label="Tone", infotext="Tone")

    @hookimpl
    def prepare_request(self, request, context):
        self.seen.append(request.extra["detail_boost"])

    @hookimpl
    def on_step(self, step):
        if self.skip_steps is not None and step.context.request.steps == self.skip_steps:
            step.context.control.skip()


@pytest.fixture(scope="module")
def boost():
    return Boost()


@pytest.fixture(scope="module")
def engine(boost):
    return make_engine(boost)


def request_of(engine, task: str = "txt2img", **values):
    base = {**TASK_DEFAULTS, "prompt": PROMPT, "xyz_enabled": True}
    return engine.fields.new_request(task, {**base, **values})


def axes(**given) -> dict:
    """Plot fields from ``x=("Steps", "2,3")``-style arguments."""
    values = {}
    for axis, (kind, text) in given.items():
        values[f"xyz_{axis}_type"], values[f"xyz_{axis}_values"] = kind, text
    return values


def plan_of(engine, limits: Limits | None = None, **values):
    request = request_of(engine, **values)
    return plot.make_plan(
        request, engine.fields, limits=limits or engine.limits, names=plot.source_names(engine)
    )


def run_plan(engine, plan_, **options):
    events = list(plot.execute(engine, plan_, **options))
    result = events[-1]
    assert isinstance(result, plot.PlotResult)
    return events[:-1], result


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# -- values --------------------------------------------------------------------------------------

REGISTRY = FieldRegistry.builtin()


@pytest.mark.parametrize(
    ("field", "text", "expected"),
    [
        ("steps", "1-5", [1, 2, 3, 4, 5]),
        ("steps", "1-10 (+2)", [1, 3, 5, 7, 9]),
        ("steps", "10-1 (-3)", [10, 7, 4, 1]),
        ("steps", "5-3", [5, 4, 3]),
        ("steps", "2, 4,8", [2, 4, 8]),
        ("steps", "1-9 [3]", [1, 5, 9]),
        ("steps", "2, 5-6, 20", [2, 5, 6, 20]),
        ("cfg_scale", "0.5-1.5 [3]", [0.5, 1.0, 1.5]),
        ("cfg_scale", "1-2 (+0.25)", [1.0, 1.25, 1.5, 1.75, 2.0]),
        ("cfg_scale", "0.1-0.3 (+0.1)", [0.1, 0.2, 0.3]),
        ("cfg_scale", "3, 7.5", [3.0, 7.5]),
        ("seed", "-1, 5", [-1, 5]),
        ("eta", "0-1 [2]", [0.0, 1.0]),
    ],
)
def test_numbers_lists_and_ranges(field, text, expected):
    kind = plot.find_axis(REGISTRY, "txt2img", field)
    assert plot.parse_values(kind, text, REGISTRY[field]) == expected


def test_choices_match_their_names_and_text_may_be_quoted():
    sampler = plot.find_axis(REGISTRY, "txt2img", "Sampler")
    names = {"samplers": ["Euler", "Euler a", "DPM++ 2M Karras"]}.get
    assert plot.parse_values(sampler, "euler a, DPM++ 2m karras", REGISTRY["sampler"], names=names) == [
        "Euler a",
        "DPM++ 2M Karras",
    ]
    with pytest.raises(
        InvalidRequestError, match=r"^Y axis \(Sampler\): unknown sampler 'Heun'; choose from Euler"
    ):
        plot.parse_values(sampler, "Euler, Heun", REGISTRY["sampler"], letter="Y", names=names)
    vae = plot.find_axis(REGISTRY, "txt2img", "VAE")
    assert plot.parse_values(
        vae, "automatic, sharp", REGISTRY["vae"], names={"models:vae": ["sharp"]}.get
    ) == [
        None,
        "sharp",
    ]
    sr = plot.find_axis(REGISTRY, "txt2img", "prompt s/r")
    assert plot.parse_values(sr, 'cat, "dog, big",\nbird', None) == ["cat", "dog, big", "bird"]


@pytest.mark.parametrize(
    ("field", "text", "words"),
    [
        ("steps", "2, abc", "X axis (Steps): 'abc' is not valid"),
        ("steps", "2.5", "whole number"),
        ("steps", "0-3", "'0-3' gives 0"),
        ("steps", "1-5 (-1)", "never reaches its end"),
        ("steps", "1-5 (+0)", "never reaches its end"),
        ("steps", "1.5-3", "needs whole numbers"),
        ("steps", " , ,", "no values"),
        ("cfg_scale", "1-5 [0]", "asks for no values"),
        ("cfg_scale", "3, 500", "'500' is not valid"),
        ("clip_skip", "1, nan", "'nan' is not valid"),
    ],
)
def test_a_bad_value_gives_one_line_naming_the_axis_and_the_value(field, text, words):
    kind = plot.find_axis(REGISTRY, "txt2img", field)
    with pytest.raises(InvalidRequestError) as caught:
        plot.parse_values(kind, text, REGISTRY[field])
    message = str(caught.value)
    assert words in message and "\n" not in message and message.startswith("X axis")


def test_an_unknown_axis_type_lists_the_ones_there_are():
    with pytest.raises(InvalidRequestError, match=r"^Z axis: unknown type 'Sharpness' for txt2img; .*Steps"):
        plot.find_axis(REGISTRY, "txt2img", "Sharpness", "Z")
    # denoising strength is an axis where the task has an init image
    assert "Denoising strength" in plot.axis_choices(REGISTRY, "img2img")
    assert plot.find_axis(REGISTRY, "img2img", "denoising").field == "strength"


@pytest.mark.parametrize(
    "text",
    ["1-1000000000", "1-1000000000000000000000000 (+1)", "1-2 [999999999999]", "0-1 (+0.0000000001)"],
)
def test_huge_ranges_are_refused_before_they_are_made(text):
    kind = plot.find_axis(REGISTRY, "txt2img", "cfg_scale")
    with pytest.raises(InvalidRequestError, match="over the plot's limit"):
        plot.parse_values(kind, text, REGISTRY["cfg_scale"], bound=100)


def test_long_values_are_bounded():
    kind = plot.find_axis(REGISTRY, "txt2img", "steps")
    with pytest.raises(InvalidRequestError, match="more than 100 values"):
        plot.parse_values(kind, ",".join(["2"] * 4000), REGISTRY["steps"], bound=100)
    with pytest.raises(InvalidRequestError, match="characters of values; the limit is 10000"):
        plot.parse_values(kind, "2," * 6000, REGISTRY["steps"], bound=100)


class NoGeneration:
    """An engine double that fails the test if anything is generated."""

    def __init__(self, fields: FieldRegistry, limits: Limits) -> None:
        self.fields, self.limits = fields, limits
        self.schedulers = SimpleNamespace(names=lambda: ["Euler"])
        self.models = SimpleNamespace(list=lambda kind: [])

    def generate(self, *args, **kwargs):  # pragma: no cover - the point is that it is not reached
        raise AssertionError("a generation started")


def test_a_plot_over_the_limit_is_refused_before_any_generation(engine, tmp_path):
    from webui.ui.service import StudioService

    double = NoGeneration(engine.fields, Limits(max_plot_images=6))
    service = StudioService(double, tmp_path)
    over = [
        (axes(x=("Steps", "2,3,4"), y=("CFG Scale", "3,5,7")), "3 x 3 x 1 cells of 1 image(s) = 9 images"),
        (axes(x=("Steps", "2,3")) | {"batch_size": 2, "batch_count": 2}, "= 8 images"),
        (axes(x=("Seed", "1-1000000000")), "over the plot's limit"),
    ]
    for values, words in over:
        with pytest.raises(InvalidRequestError) as caught:
            list(service.run(request_of(engine, **values), "someone"))
        assert words in str(caught.value)
    with pytest.raises(LimitExceeded, match=r"--max-plot-images"):
        plan_of(engine, Limits(max_plot_images=3), **axes(x=("Steps", "2,3"), y=("Eta", "0, 1")))
    with pytest.raises(LimitExceeded, match="--max-steps"):  # every cell is checked against the limits too
        plan_of(engine, **axes(x=("Steps", "2, 500")))
    assert not list(tmp_path.rglob("*.png"))
    # 0: no limit on the plot (each axis still bounded)
    assert (
        len(
            plan_of(
                engine, Limits(max_plot_images=0), **axes(x=("Steps", "1-50"), y=("Eta", "0-1 [3]"))
            ).cells
        )
        == 150
    )


def test_seeds_are_fixed_once_unless_kept_random(engine):
    fixed = plan_of(engine, seed=-1, **axes(x=("Steps", "2,3")))
    seeds = {cell.request.seed for cell in fixed.cells}
    assert len(seeds) == 1 and seeds != {-1}
    kept = plan_of(engine, seed=-1, xyz_keep_seeds=True, **axes(x=("Seed", "-1, 5")))
    assert [cell.request.seed for cell in kept.cells] == [-1, 5]
    drawn = plan_of(engine, **axes(x=("Seed", "-1, 5")))
    assert drawn.cells[0].request.seed != -1 and drawn.cells[1].request.seed == 5
    assert drawn.describe()["Fixed X Values"] == f"{drawn.cells[0].request.seed}, 5"


def test_prompt_search_and_replace(engine):
    planned = plan_of(engine, negative_prompt="a cat", **axes(y=("Prompt S/R", "cat, dog, small bird")))
    assert [(c.request.prompt, c.request.negative_prompt) for c in planned.cells] == [
        (PROMPT, "a cat"),
        ("a red dog on a blue mat", "a dog"),
        ("a red small bird on a blue mat", "a small bird"),
    ]
    assert planned.y.labels == ("cat", "dog", "small bird")
    with pytest.raises(
        InvalidRequestError, match=r"^X axis \(Prompt S/R\): 'horse' is in neither the prompt"
    ):
        plan_of(engine, **axes(x=("Prompt S/R", "horse, cow")))


# -- running ----------------------------------------------------------------------------------


def single(engine, **values):
    """The image one plain request with ``values`` makes."""
    request = engine.fields.new_request("txt2img", {**TASK_DEFAULTS, "prompt": PROMPT, **values})
    return engine.generate(request).images[0].image


def test_a_2x2_plot_equals_the_single_generations_under_drawn_labels(engine, tmp_path):
    planned = plan_of(engine, **axes(x=("Steps", "2,3"), y=("cfg_scale", "3,7")))
    assert planned.images == 4 and [(c.x, c.y) for c in planned.cells] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    events, result = run_plan(engine, planned, grid_dir=tmp_path / "grids", preview_every=1)
    assert [event.describe().split(" · ")[0] for event in events] == [
        *["Cell 1 of 4"] * 2,
        *["Cell 2 of 4"] * 3,
        *["Cell 3 of 4"] * 2,
        *["Cell 4 of 4"] * 3,
    ]
    assert [event.done for event in events] == sorted(event.done for event in events)
    assert events[-1].done == events[-1].overall == 10
    assert any(event.preview for event in events)  # the usual step preview
    assert not result.interrupted and len(result.images) == 4
    for cell, images in zip(planned.cells, result.cells, strict=True):
        steps, cfg = cell.request.steps, cell.request.cfg_scale
        assert np.array_equal(pixels(images[0].image), pixels(single(engine, steps=steps, cfg_scale=cfg)))
        parsed = parse_infotext(images[0].parameters["infotext"])  # its own infotext
        assert (parsed["Steps"], parsed["CFG scale"]) == (str(steps), f"{cfg:g}")
    (grid,) = result.grids
    image = grid.image
    left, top = image.width - 2 * SIZE, image.height - 2 * SIZE
    assert left > 0 and top > 0  # label strips on the left and the top
    canvas = pixels(image)
    for cell, images in zip(planned.cells, result.cells, strict=True):
        x0, y0 = left + cell.x * SIZE, top + cell.y * SIZE
        assert np.array_equal(canvas[y0 : y0 + SIZE, x0 : x0 + SIZE], pixels(images[0].image))
    white = np.array([255, 255, 255])
    for strip in (canvas[:top, left:], canvas[top:, :left]):  # the labels were drawn
        ink = np.any(strip != white, axis=2)
        assert 0.01 < ink.mean() < 0.6
    assert canvas[:top, :left].tolist() == np.full((top, left, 3), 255).tolist()  # the corner stays blank
    # the saved grid carries the axes in its parameters
    assert grid.path is not None and grid.path.parent == tmp_path / "grids"
    saved = parse_infotext(read_png_parameters(grid.path))
    assert (saved["X Type"], saved["X Values"], saved["Y Type"], saved["Y Values"]) == (
        "Steps",
        "2,3",
        "CFG Scale",
        "3,7",
    )
    assert saved["Prompt"] == PROMPT and saved["Script"] == "X/Y/Z plot"


def test_no_legend_and_a_z_axis_give_one_bare_grid_per_z_value(engine):
    planned = plan_of(engine, xyz_draw_legend=False, **axes(x=("Steps", "2,3"), z=("Seed", "1, 2")))
    _, result = run_plan(engine, planned)
    assert [grid.image.size for grid in result.grids] == [(2 * SIZE, SIZE)] * 2
    for grid, z in zip(result.grids, (1, 2), strict=True):
        canvas = pixels(grid.image)
        assert np.array_equal(canvas[:, :SIZE], pixels(single(engine, steps=2, seed=z)))
        assert parse_infotext(grid.infotext)["Z Value"] == f"Seed: {z}"
    titled = plot.draw_grid([None, None], columns=2, cell_size=(SIZE, SIZE), title="Seed: 1")
    assert titled.height > SIZE and np.any(pixels(titled)[: titled.height - SIZE] != 255)


def test_interrupt_after_k_cells_keeps_k_images_and_a_grid(engine, tmp_path):
    from webui.output import BatchSaver

    planned = plan_of(engine, **axes(x=("Steps", "2,3"), y=("CFG Scale", "3,7")))
    control = GenerationControl()
    saver = BatchSaver(tmp_path / "images")

    def save_then_stop(images):
        saver(images)
        if len(saver.items) == 2:
            control.interrupt()

    _, result = run_plan(
        engine, planned, control=control, on_batch=save_then_stop, grid_dir=tmp_path / "grids"
    )
    assert result.interrupted
    assert [len(images) for images in result.cells] == [1, 1, 0, 0]
    assert len(saver.saved) == 2 and len(list((tmp_path / "grids").glob("*.png"))) == 1
    for path, item in zip(saver.saved, result.images, strict=True):
        assert read_png_parameters(path) == item.parameters["infotext"]
    canvas = pixels(result.grids[0].image)
    left, top = canvas.shape[1] - 2 * SIZE, canvas.shape[0] - 2 * SIZE
    assert np.all(canvas[top + SIZE :, left:] == 255)  # the cells that did not run stay blank
    assert np.array_equal(canvas[top : top + SIZE, left : left + SIZE], pixels(result.images[0].image))
    # interrupted before the first cell: nothing generated, the grid still drawn, blank, with its axes
    stopped = GenerationControl()
    stopped.interrupt()
    _, nothing = run_plan(engine, planned, control=stopped)
    assert nothing.interrupted and nothing.images == [] and len(nothing.grids) == 1
    blank = pixels(nothing.grids[0].image)
    assert blank.shape == canvas.shape and np.all(blank[top:, left:] == 255)
    assert parse_infotext(nothing.grids[0].infotext)["X Values"] == "2,3"


def test_skip_drops_the_current_cell_and_goes_on(engine, boost):
    planned = plan_of(engine, **axes(x=("Steps", "2,3,4")))
    boost.skip_steps = 3
    try:
        _, result = run_plan(engine, planned)
    finally:
        boost.skip_steps = None
    assert not result.interrupted
    assert [len(images) for images in result.cells] == [1, 0, 1]


def test_a_plugin_field_is_an_axis_with_no_plot_code(engine, boost):
    assert {"Detail boost", "Tone"} <= set(plot.axis_choices(engine.fields, "txt2img"))
    boost.seen.clear()
    planned = plan_of(engine, **axes(x=("Detail boost", "0-1 [3]"), y=("tone", "Cold, warm")))
    assert planned.x.labels == ("Detail boost: 0", "Detail boost: 0.5", "Detail boost: 1")
    assert planned.y.labels == ("cold", "warm")
    _, result = run_plan(engine, planned)
    assert boost.seen == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    parsed = [parse_infotext(item.parameters["infotext"]) for item in result.images]
    assert [entry.get("Detail boost") for entry in parsed] == [None, "0.5", "1", None, "0.5", "1"]
    assert [entry.get("Tone") for entry in parsed] == ["cold"] * 3 + [None] * 3
    with pytest.raises(
        InvalidRequestError, match=r"^Y axis \(Tone\): unknown tone 'hot'; choose from warm, cold"
    ):
        plan_of(engine, **axes(y=("Tone", "hot")))


# -- the web app, the command line and the HTTP API --------------------------------------------


def test_the_service_runs_a_plot_like_a_generation(engine, tmp_path):
    from webui.ui.service import Finished, StudioService

    service = StudioService(engine, tmp_path)
    request = request_of(engine, seed=11, **axes(x=("Steps", "2,3")))
    events = list(service.run(request, "someone"))
    assert any(event.describe().startswith("Cell 2 of 2") for event in events[:-1])
    finished = events[-1]
    assert isinstance(finished, Finished) and not finished.interrupted and finished.warning is None
    assert [caption for _, caption in finished.files] == ["grid", "seed 11", "seed 11"]
    day = datetime.date.today().strftime("%Y-%m-%d")
    grid_path, first, second = (Path(path) for path, _ in finished.files)
    assert grid_path.parent == tmp_path / "txt2img-grids" / day
    assert first.parent == second.parent == tmp_path / "txt2img" / day
    for path, infotext in zip((grid_path, first, second), finished.infotexts, strict=True):
        assert read_png_parameters(path) == infotext
    assert "X Type: Steps" in finished.infotexts[0] and "X Type" not in finished.infotexts[1]
    assert [parse_infotext(text)["Steps"] for text in finished.infotexts[1:]] == ["2", "3"]


def test_the_web_ui_has_the_plot_accordion_with_every_axis(engine):
    from webui.testing import build_ui, ui_components

    controls = ui_components(build_ui(engine))
    for tab in ("txt2img", "img2img"):
        assert type(controls[f"{tab}-x-y-z-plot"]).__name__ == "Accordion"
        dropdown = controls[f"{tab}-xyz-x-type"]
        offered = [choice[0] if isinstance(choice, (list, tuple)) else choice for choice in dropdown.choices]
        assert offered[:4] == ["Nothing", "Seed", "Steps", "CFG Scale"] and "Detail boost" in offered
        assert offered == plot.axis_choices(engine.fields, tab)
        for name in ("xyz-enabled", "xyz-x-values", "xyz-z-type", "xyz-draw-legend", "xyz-keep-seeds"):
            assert f"{tab}-{name}" in controls
    assert "inpaint-xyz-enabled" not in controls


def test_cli_generate_with_axes_writes_the_grid_and_the_images(tiny_model_dir, tmp_path, capsys):
    from webui.cli import main

    out = tmp_path / "out"
    argv = ["--models-dir", str(tiny_model_dir.parent), "--device", "cpu", "generate"]
    argv += ["--model", tiny_model_dir.name, "--prompt", PROMPT, "--width", "64", "--height", "64"]
    argv += ["--sampler", "Euler", "--seed", "5", "--steps", "2", "--out", str(out)]
    assert main([*argv, "--x", "steps=2,3", "--y", "CFG Scale=3, 7"]) == 0
    printed = capsys.readouterr().out.split()
    day = datetime.date.today().strftime("%Y-%m-%d")
    images = sorted((out / "txt2img" / day).glob("*.png"))
    grids = sorted((out / "txt2img-grids" / day).glob("*.png"))
    assert len(images) == 4 and len(grids) == 1 and sorted(printed) == sorted(map(str, images + grids))
    assert [parse_infotext(read_png_parameters(p))["Steps"] for p in images] == ["2", "3", "2", "3"]
    assert parse_infotext(read_png_parameters(grids[0]))["Y Values"] == "3, 7"
    assert Image.open(grids[0]).size[0] > 2 * 64
    assert main([*argv, "--x", "steps"]) == 2
    assert "--x 'steps': write TYPE=VALUES" in capsys.readouterr().err
    assert main([*argv, "--x", "steps=2,x"]) == 2
    assert "X axis (Steps): 'x' is not valid" in capsys.readouterr().err


def test_a1111_script_args_become_a_plot(engine, tmp_path):
    from webui.http import a1111
    from webui.ui.service import StudioService

    body = {
        "prompt": PROMPT,
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 3,
        "sampler_name": "Euler",
        "script_name": "X/Y/Z plot",
        # X type 4 is A1111's "Steps", Y type 6 its "CFG Scale" (txt2img), Z 0 "Nothing"
        "script_args": [
            4,
            "2,3",
            [],
            6,
            "",
            ["3", "7"],
            0,
            "",
            [],
            True,
            False,
            False,
            False,
            0,
            False,
            False,
        ],
    }
    parsed = a1111.parse_body(body, "txt2img", engine, {})
    extra = parsed.request.extra
    assert (extra["xyz_x_type"], extra["xyz_x_values"], extra["xyz_y_type"], extra["xyz_y_values"]) == (
        "Steps",
        "2,3",
        "CFG Scale",
        "3,7",
    )
    assert parsed.grids_only
    finished = list(StudioService(engine, tmp_path).run(parsed.request, "api", save=False))[-1]
    answer = a1111.answer(parsed, finished)
    assert len(answer["images"]) == 1 and len(finished.files) == 5
    grid = a1111.decode_image(answer["images"][0], "grid")
    assert grid.width > 2 * SIZE and read_png_parameters(grid) == finished.infotexts[0]
    info = json.loads(answer["info"])
    assert "X Type: Steps" in info["infotexts"][0]
    lone = a1111.parse_body({**body, "script_args": [*body["script_args"][:10], True]}, "txt2img", engine, {})
    assert len(a1111.answer(lone, finished)["images"]) == 5  # the grid first, then every image
    for script_name, args, words in [
        ("img2img alternative test", [], "not supported; the one script is 'x/y/z plot'"),
        ("x/y/z plot", [4, "2"], "at least 9 values"),
        ("x/y/z plot", [2, "1,2", [], 0, "", [], 0, "", []], "unknown type 'Var. seed'"),
        ("x/y/z plot", [99, "1", [], 0, "", [], 0, "", []], "type 99 is not one of A1111's axes"),
        ("x/y/z plot", [4, "2-900", [], 0, "", [], 0, "", []], "over the plot's limit"),
        (None, [4], "script_args needs a script_name"),
    ]:
        with pytest.raises(InvalidRequestError, match=words):
            a1111.parse_body({**body, "script_name": script_name, "script_args": args}, "txt2img", engine, {})


# -- in the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_server(tmp_path_factory):
    from ui_server import Server

    server = Server(tmp_path_factory.mktemp("outputs"))
    yield server
    server.close()


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_accordion_runs_a_plot_into_the_gallery(browser, shapes_server):
    from ui_server import ROOT

    wait_ms = 120_000
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    try:
        page.goto(shapes_server.url)
        page.locator("#txt2img-prompt textarea").wait_for(timeout=wait_ms)
        page.locator("#txt2img-prompt textarea").fill("a large red circle in the center on a blue background")
        page.locator("#txt2img-seed input").fill("21")
        page.locator("#txt2img-x-y-z-plot").get_by_text("X/Y/Z plot").first.click()
        page.locator("#txt2img-xyz-enabled input[type=checkbox]").check()
        axis = page.locator("#txt2img-xyz-x-type input")
        axis.click()
        axis.fill("Steps")
        axis.press("Enter")
        page.locator("#txt2img-xyz-x-values").locator("textarea, input").first.fill("2,3")
        page.locator("#txt2img-generate").click()
        page.wait_for_function(
            "() => document.querySelectorAll('#txt2img-gallery img').length >= 3", timeout=wait_ms
        )
        assert "X Type: Steps" in page.locator("#txt2img-infotext textarea").input_value()
        day = datetime.date.today().strftime("%Y-%m-%d")
        (grid,) = sorted((shapes_server.outputs / "txt2img-grids" / day).glob("*-21.png"))
        saved = parse_infotext(read_png_parameters(grid))
        assert (saved["X Type"], saved["X Values"], saved["Seed"]) == ("Steps", "2,3", "21")
        images = sorted((shapes_server.outputs / "txt2img" / day).glob("*-21.png"))
        assert [parse_infotext(read_png_parameters(path))["Steps"] for path in images] == ["2", "3"]
        with Image.open(grid) as opened:
            width, height = opened.size
            size = Image.open(images[0]).size
            assert width == 2 * size[0] and height > size[1]  # two columns under their labels
        shots = ROOT / "test-artifacts" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "xyz-plot.png"), full_page=True)
    finally:
        page.close()
