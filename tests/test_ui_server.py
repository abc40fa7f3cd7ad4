"""The web app end to end: a real gradio server started by the test, called with gradio_client.

Every tab is exercised through its public API endpoint (the same event the Generate button
fires), on the shipped shapes model, and the images that come back and the files saved are
checked pixel by pixel.
"""

from __future__ import annotations

import datetime
import shutil
import time

import httpx
import numpy as np
import pytest
import torch
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image
from ui_server import Server, arguments, call, call_named, submit
from waiting import wait_until

from training import shapes
from training.analyse import analyse, colour_share
from training.phrasing import example_prompts, read_caption, read_pair_caption
from webui.metadata import parse_infotext, read_png_parameters
from webui.ui.app import BUSY_MESSAGE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FAST = {"Steps": 8, "Seed (-1 = random)": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("outputs"), "--queue-size", "4")
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def saved(path: str) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_txt2img_generates_saves_and_describes(server, client):
    progress, preview, gallery, infotext = call(
        client, "txt2img", Prompt="a large red circle in the center on a blue background", **FAST
    )[:4]
    assert progress.startswith("1 image(s) in")
    assert len(gallery) == 1
    image = saved(gallery[0]["image"])
    assert image.size == (64, 64)
    reading = analyse(image.convert("RGB"))
    assert reading.color == "red" and reading.background == "blue"
    # saved once, under outputs/<task>/<date>/NNNNN-<seed>.png, with A1111's parameters text
    day = server.outputs / "txt2img" / datetime.date.today().strftime("%Y-%m-%d")
    files = sorted(day.glob("*-5.png"))
    assert files, f"nothing saved in {day}"
    text = read_png_parameters(files[-1])
    assert text == infotext
    assert parse_infotext(text)["Seed"] == "5"
    assert np.array_equal(np.asarray(saved(files[-1])), np.asarray(image))


def test_batches_give_consecutive_seeds(client):
    gallery = call(
        client,
        "txt2img",
        Prompt="a small green square",
        **{"Batch count": 2, "Batch size": 2, "Steps": 4, "Seed (-1 = random)": 40},
    )[2]
    assert [item["caption"] for item in gallery] == ["seed 40", "seed 41", "seed 42", "seed 43"]


def test_img2img_keeps_the_init_image_at_low_strength(client, tmp_path):
    scene = shapes.Scene("square", "yellow", "large", "center", "purple")
    init, _ = scene.render()
    init.save(tmp_path / "init.png")
    gallery = call(
        client,
        "img2img",
        Prompt=scene.caption(),
        **{
            "Init image": handle_file(str(tmp_path / "init.png")),
            "Denoising strength": 0.3,
            "Steps": 10,
            "Seed (-1 = random)": 1,
        },
    )[2]
    out = np.asarray(saved(gallery[0]["image"]).convert("RGB"), dtype=np.float32)
    assert np.abs(out - np.asarray(init, dtype=np.float32)).mean() < 20


def _editor(background: str, layer: str | None) -> dict:
    return {
        "background": handle_file(background),
        "layers": [handle_file(layer)] if layer else [],
        "composite": handle_file(background),
        "id": None,
    }


def test_inpaint_with_a_painted_mask_keeps_the_rest(client, tmp_path):
    base = shapes.Scene("triangle", "green", "small", "top left", "gray")
    init, _ = base.render()
    init.save(tmp_path / "init.png")
    stroke = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # a painted layer: white, opaque where painted
    stroke.paste((255, 255, 255, 255), (32, 32, 60, 60))
    stroke.save(tmp_path / "stroke.png")
    gallery = call(
        client,
        "inpaint",
        Prompt="a large orange circle at the bottom right on a gray background",
        **{
            "Image and mask: upload, then paint over what should change": _editor(
                str(tmp_path / "init.png"), str(tmp_path / "stroke.png")
            ),
            "Mask blur": 0,
            "Steps": 10,
            "Seed (-1 = random)": 3,
        },
    )[2]
    out = np.asarray(saved(gallery[0]["image"]).convert("RGB"))
    keep = np.ones((64, 64), dtype=bool)
    keep[32:60, 32:60] = False
    assert np.array_equal(out[keep], np.asarray(init)[keep])
    assert not np.array_equal(out[~keep], np.asarray(init)[~keep])


def test_inpaint_with_an_uploaded_mask(client, tmp_path):
    init, _ = shapes.Scene("circle", "blue", "small", "left", "white").render()
    init.save(tmp_path / "init.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:40, 30:62] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    gallery = call(
        client,
        "inpaint",
        Prompt="a large red square at the top right on a white background",
        **{
            "Image and mask: upload, then paint over what should change": _editor(
                str(tmp_path / "init.png"), None
            ),
            "Mask": handle_file(str(tmp_path / "mask.png")),
            "Mask blur": 0,
            "Steps": 10,
            "Seed (-1 = random)": 2,
        },
    )[2]
    out = np.asarray(saved(gallery[0]["image"]).convert("RGB"))
    assert np.array_equal(out[mask == 0], np.asarray(init)[mask == 0])


def test_seg2img_follows_a_painted_map(client, tmp_path):
    scene = shapes.Scene("square", "blue", "large", "top left", "yellow")
    _, labels = scene.render()
    shapes.class_map_image(labels).save(tmp_path / "map.png")
    gallery = call(
        client,
        "seg2img",
        Prompt="a blue square on a yellow background",
        **{
            "Segmentation map: paint classes with the palette's colours": _editor(
                str(tmp_path / "map.png"), None
            ),
            "Steps": 12,
            "Seed (-1 = random)": 2,
        },
    )[2]
    image = saved(gallery[0]["image"])
    assert colour_share(image, labels > 0, "blue") > 0.6
    assert colour_share(image, labels == 0, "yellow") > 0.6


def test_pnginfo_reads_ours_and_sends_to_a_tab(client, server):
    gallery = call(
        client,
        "txt2img",
        Prompt="a small white triangle",
        **{"Steps": 3, "Seed (-1 = random)": 77, "CFG scale": 6.5},
    )[2]
    text, parsed, notes = call(client, "pnginfo", **{"Drop an image": handle_file(gallery[0]["image"])})
    assert notes == ""
    assert text.startswith("a small white triangle\n")
    assert parsed["Seed"] == "77" and parsed["Steps"] == "3"
    sent = call_named(client, "pnginfo_to_img2img", text)
    assert sent["Prompt"] == "a small white triangle"
    assert sent["Steps"] == 3 and sent["CFG scale"] == 6.5 and (sent["Width"], sent["Height"]) == (64, 64)
    assert sent["Seed (-1 = random)"] == 77 and sent["Model"] == "latent-studio-shapes"


def test_pnginfo_reads_an_a1111_png(client, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    text = (
        "masterpiece, a castle\nNegative prompt: blurry\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 6, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        "Version: v1.10.1"
    )
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (16, 16)).save(tmp_path / "a1111.png", pnginfo=info)
    got, parsed, _ = call(client, "pnginfo", **{"Drop an image": handle_file(str(tmp_path / "a1111.png"))})
    assert got == text and parsed["Size-2"] == "768"
    sent = call_named(client, "pnginfo_to_txt2img", text)
    assert sent["Sampler"] == "DPM++ 2M Karras" and sent["Seed (-1 = random)"] == 1234
    assert (sent["Width"], sent["Height"]) == (512, 768) and sent["Negative prompt"] == "blurry"
    assert sent["Model"] == {"__type__": "update"}  # not installed: the model choice is left as it is


def test_bad_input_gives_a_message_and_the_server_keeps_serving(client, tmp_path):
    with pytest.raises(AppError, match="upload an init image"):
        call(client, "img2img", Prompt="x", Steps=2)
    with pytest.raises(AppError, match="paint a mask"):
        init, _ = shapes.Scene("circle", "red", "small", "left", "blue").render()
        init.save(tmp_path / "init.png")
        call(
            client,
            "inpaint",
            Prompt="x",
            Steps=2,
            **{
                "Image and mask: upload, then paint over what should change": _editor(
                    str(tmp_path / "init.png"), None
                )
            },
        )
    with pytest.raises(AppError, match="leaves no step to run"):  # the engine's own message
        call(
            client,
            "img2img",
            Prompt="x",
            Steps=2,
            **{"Init image": handle_file(str(tmp_path / "init.png")), "Denoising strength": 0.0},
        )
    progress = call(client, "txt2img", Prompt="a red circle", Steps=2, **{"Seed (-1 = random)": 1})[0]
    assert progress.startswith("1 image(s)")


def test_oversized_upload_is_refused_with_a_message(client, tmp_path):
    from webui.images import MAX_PIXELS

    side = int(MAX_PIXELS**0.5) + 64  # just over the cap; a 1-bit PNG of it is a few hundred KB
    Image.new("1", (side, side)).save(tmp_path / "bomb.png", optimize=True)
    with pytest.raises(AppError, match="too large|decompression bomb"):
        call(
            client, "img2img", Prompt="x", Steps=2, **{"Init image": handle_file(str(tmp_path / "bomb.png"))}
        )
    assert call(client, "txt2img", Prompt="a red circle", Steps=2)[0].startswith("1 image(s)")


def test_rgba_palette_16bit_and_rotated_uploads(client, tmp_path):
    scene = shapes.Scene("circle", "red", "large", "center", "blue")
    base, _ = scene.render()
    variants = {
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "16bit.png": Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": stored turned the other way
    variants["rotated.jpg"] = base.transpose(Image.Transpose.ROTATE_90)
    for name, image in variants.items():
        kwargs = {"exif": exif} if name.endswith(".jpg") else {}
        image.save(tmp_path / name, **kwargs)
    for name in variants:
        gallery = call(
            client,
            "img2img",
            Prompt=scene.caption(),
            **{
                "Init image": handle_file(str(tmp_path / name)),
                "Denoising strength": 0.1,
                "Steps": 10,
                "Seed (-1 = random)": 1,
            },
        )[2]
        out = saved(gallery[0]["image"])
        assert out.size == (64, 64), name
        if name in ("rgba.png", "palette.png", "rotated.jpg"):  # colour kept, upright
            centre = np.asarray(out.convert("RGB"))[28:36, 28:36].reshape(-1, 3).mean(axis=0)
            assert centre[0] > 150 and centre[2] < 120, (name, centre)


def test_interrupt_stops_within_a_step_and_keeps_finished_images(server):
    client = server.client()
    job = submit(
        client, "txt2img", Prompt="a red circle", Steps=150, **{"Batch count": 4, "Seed (-1 = random)": 9}
    )
    wait_until_running(job)
    started = time.time()
    client.predict(api_name="/txt2img_interrupt")
    progress, _, gallery = job.result(timeout=60)[:3]
    assert time.time() - started < 10
    assert "interrupted" in progress
    assert len(gallery) < 4


def wait_until_running(job, timeout: float = 60) -> None:
    """Until the job has streamed its first progress update (it is in the denoising loop)."""
    wait_until(
        lambda: any("Step" in str(output[0]) for output in job.outputs()),
        timeout=timeout,
        what="the job's first progress update",
    )


def test_a_full_queue_says_busy(tmp_path):
    server = Server(tmp_path / "outputs", "--queue-size", "1")
    try:
        first, second, third = server.client(), server.client(), server.client()
        running = submit(first, "txt2img", Prompt="a red circle", Steps=150, **{"Batch count": 8})
        wait_until_running(running)  # running now: the queue is empty again
        waiting = submit(second, "txt2img", Prompt="a red circle", Steps=2)
        wait_until(
            lambda: len(server.demo._queue) == 1, timeout=60, what="the second generation joining the queue"
        )
        # gradio_client words it itself ...
        with pytest.raises(QueueError, match="(?i)try again"):
            call(third, "txt2img", Prompt="a blue square", Steps=2)
        # ... what the server answers (and the browser shows) is ours
        fn_index = next(d["id"] for d in third.config["dependencies"] if d.get("api_name") == "txt2img")
        reply = httpx.post(
            f"{server.url}gradio_api/queue/join",
            json={
                "data": arguments(third, "txt2img", Prompt="x"),
                "fn_index": fn_index,
                "session_hash": "busy-test",
                "event_data": None,
                "trigger_id": None,
            },
        )
        assert reply.status_code == 503
        assert reply.json()["detail"] == BUSY_MESSAGE.format(size=1)
        first.predict(api_name="/txt2img_interrupt")
        running.result(timeout=60)
        assert waiting.result(timeout=60)[0].startswith("1 image(s)")
    finally:
        server.close()


def test_each_user_keeps_their_own_model(tmp_path, tiny_model_dir):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(shapes_model_dir(), models / "latent-studio-shapes")
    shutil.copytree(tiny_model_dir, models / "tiny-sd")
    server = Server(tmp_path / "outputs", "--models-dir", str(models))
    try:
        alice, bob = server.client(), server.client()
        jobs = [
            submit(alice, "txt2img", Model="tiny-sd", Prompt="a cat", Steps=3, **{"Seed (-1 = random)": 1}),
            submit(bob, "txt2img", Model="latent-studio-shapes", Prompt="a red circle", Steps=3),
            submit(alice, "txt2img", Model="tiny-sd", Prompt="a dog", Steps=3),
        ]
        models_used = [parse_infotext(job.result(timeout=120)[3])["Model"] for job in jobs]
        assert models_used == ["tiny-sd", "latent-studio-shapes", "tiny-sd"]
        # a folder added while serving shows up on refresh (the list is rescanned) and can be used
        shutil.copytree(tiny_model_dir, models / "tiny-2")
        assert "tiny-2" in server.demo.studio_service.model_names()
        assert call(bob, "txt2img", Model="tiny-2", Prompt="x", Steps=2)[3].endswith("Model: tiny-2")
    finally:
        server.close()


def shapes_model_dir():
    from ui_server import MODELS

    return MODELS / "latent-studio-shapes"


def test_the_default_model_offers_its_vocabulary_and_palette(server):
    import gradio as gr

    from webui.ui.tabs.segmap import legend_html

    datasets = [block for block in server.demo.blocks.values() if isinstance(block, gr.Dataset)]
    samples = {row[0] for dataset in datasets for row in dataset.raw_samples}
    assert samples == set(example_prompts())  # the examples the model ships in model_index.json
    # in the phrasings the model was trained on, one and two objects, each saying a whole scene
    assert all(read_caption(text) or read_pair_caption(text) for text in samples)
    assert any(read_pair_caption(text) for text in samples)
    legends = [
        block.value
        for block in server.demo.blocks.values()
        if isinstance(block, gr.HTML) and "ls-legend" in str(block.value)
    ]
    assert legends and all(name in legends[0] for name in shapes.CLASSES)
    info = server.demo.studio_service.model_info("latent-studio-shapes")
    assert legends[0] == legend_html(info.palette) and info.palette.classes == shapes.CLASSES


def test_skip_drops_the_current_batch_only(server):
    client = server.client()
    job = submit(
        client, "txt2img", Prompt="a red circle", Steps=60, **{"Batch count": 2, "Seed (-1 = random)": 20}
    )
    wait_until_running(job)
    client.predict(api_name="/txt2img_skip")
    progress, _, gallery = job.result(timeout=120)[:3]
    assert [item["caption"] for item in gallery] == ["seed 21"]  # batch 1 skipped, batch 2 finished
    assert progress.startswith("1 image(s)")


def test_vae_lora_embedding_and_controlnet_pickers(tmp_path, tiny_model_dir):
    """The VAE picker's choice reaches the request (and the parameters), the extra-network pickers
    list models/lora and models/embeddings, and the seg tab offers models/controlnet with its palette."""
    import torch
    from ldm_format import vae_to_ldm, write_single_file
    from safetensors.torch import save_file
    from tiny import make_vae

    from webui.engine.segmap import ADE20K
    from webui.ui.controls import add_to_prompt

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "tiny-sd")
    (models / "vae").mkdir(parents=True)
    write_single_file(models / "vae" / "crisp.safetensors", vae_to_ldm(make_vae(9).state_dict(), prefix=""))
    for kind, name in (("lora", "ink"), ("embeddings", "my-style")):
        (models / kind).mkdir()
        save_file({"emb_params": torch.zeros(1, 32)}, models / kind / f"{name}.safetensors")
    shutil.copytree(tiny_model_dir / "controlnet", models / "controlnet" / "seg-net")
    server = Server(tmp_path / "outputs", "--models-dir", str(models), "--model", "tiny-sd")
    try:
        service = server.demo.studio_service
        assert service.names("vae") == ["crisp"] and service.names("lora") == ["ink"]
        assert service.names("embedding") == ["my-style"]
        assert "seg-net" in service.names("controlnet")
        assert service.controlnet_palette("seg-net") is ADE20K  # no palette.json: the public seg palette
        client = server.client()
        small = {
            "Steps": 2,
            "Seed (-1 = random)": 3,
            "Width": 64,
            "Height": 64,
        }  # the tiny model's own size, kept small
        plain = call(client, "txt2img", Prompt="a cat", **small)
        swapped = call(client, "txt2img", Prompt="a cat", VAE="crisp", **small)
        assert "VAE: crisp" in swapped[3] and "VAE" not in parse_infotext(plain[3])
        assert (
            call_named(client, "pnginfo_to_img2img", swapped[3])["VAE"] == "crisp"
        )  # PNG Info sends it back
        assert call_named(client, "pnginfo_to_img2img", swapped[3].replace("VAE: crisp", "VAE: gone"))[
            "VAE"
        ] == {"__type__": "update"}  # not installed: the VAE choice is left as it is
        a, b = (np.asarray(saved(result[2][0]["image"]), dtype=np.float32) for result in (plain, swapped))
        assert np.abs(a - b).mean() > 1.0  # another VAE decoded it
        with pytest.raises(AppError, match="not allowed"):
            call(client, "txt2img", Prompt="a cat", VAE="../vae/crisp", **small)
    finally:
        server.close()
    assert add_to_prompt("a cat", "<lora:ink:1>") == "a cat, <lora:ink:1>"
    assert add_to_prompt("", "my-style") == "my-style" and add_to_prompt("a cat,", "x") == "a cat, x"


def test_out_of_memory_is_retried_or_explained_and_the_server_keeps_serving(server, client):
    from webui.api import hookimpl

    class Exhaust:  # out of memory at the second step of the first `times` attempts
        def __init__(self, times: int) -> None:
            self.times = times

        @hookimpl
        def on_step(self, step):
            if step.step == 2 and self.times > 0:
                self.times -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    plugins = server.engine.plugins
    once = Exhaust(1)
    plugins.register(once, name="exhaust-once")
    try:
        infotext = call(client, "txt2img", Prompt="a red circle", Steps=3, **{"Seed (-1 = random)": 3})[3]
    finally:
        plugins.unregister(name="exhaust-once")
    assert parse_infotext(infotext)["Memory"] == "tiled VAE (retried after running out of memory)"
    always = Exhaust(100)
    plugins.register(always, name="exhaust-always")
    try:
        with pytest.raises(AppError, match="out of memory even with the lowest-memory plan"):
            call(client, "txt2img", Prompt="a red circle", Steps=3)
    finally:
        plugins.unregister(name="exhaust-always")
    progress = call(client, "txt2img", Prompt="a red circle", Steps=2, **{"Seed (-1 = random)": 1})[0]
    assert progress.startswith("1 image(s)")


def test_a_request_failing_in_batch_2_keeps_and_names_batch_1(server, client):
    from webui.api import hookimpl

    class FailInBatch2:
        @hookimpl
        def on_step(self, step):
            if step.context.batch_index == 1:
                raise RuntimeError("the device fell over")

    server.engine.plugins.register(FailInBatch2(), name="fail-in-batch-2")
    try:
        with pytest.raises(AppError) as failure:
            call(
                client,
                "txt2img",
                Prompt="a red circle",
                Steps=3,
                **{"Batch count": 2, "Seed (-1 = random)": 70},
            )
    finally:
        server.engine.plugins.unregister(name="fail-in-batch-2")
    day = server.outputs / "txt2img" / datetime.date.today().isoformat()
    message = str(failure.value)
    assert message.endswith(
        f"(1 image of the finished batches was saved to {server.outputs.name}/txt2img/{day.name})"
    )
    assert "RuntimeError: the device fell over" in message and "\n" not in message
    saved_files = sorted(day.glob("*-70.png"))
    assert saved_files and "Seed: 70," in read_png_parameters(saved_files[-1])
    assert not list(day.glob("*-71.png"))
    assert call(client, "txt2img", Prompt="a red circle", Steps=2)[0].startswith(
        "1 image(s)"
    )  # still serving


def test_an_unwritable_outputs_folder_still_shows_the_images(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the outputs folder's parent should be")
    server = Server(blocker / "outputs")
    try:
        progress, _, gallery, infotext = call(
            server.client(),
            "txt2img",
            Prompt="a red circle",
            Steps=3,
            **{"Batch count": 2, "Seed (-1 = random)": 5},
        )[:4]
    finally:
        server.close()
    day = datetime.date.today().isoformat()
    assert progress.startswith("2 image(s) in")
    assert progress.endswith(f" · 2 images could not be saved to outputs/txt2img/{day}: Not a directory")
    assert str(tmp_path) not in progress
    assert [item["caption"] for item in gallery] == ["seed 5", "seed 6"]
    assert saved(gallery[1]["image"]).size == (64, 64)
    assert parse_infotext(infotext)["Seed"] == "5"
    assert blocker.read_text().startswith("a file")
