"""Model folders: listing every kind (ours, A1111's and ComfyUI's layouts), names kept inside the
folders, and A1111's cached sha256 "Model hash". Real files in tmp_path; the weights are fake bytes
except where a generation runs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from webui.engine.bundle import ModelBundle
from webui.engine.folders import (
    HASH_CACHE_NAME,
    ModelFolders,
    check_name,
    default_cache_dir,
    model_hash,
    resolve_in_root,
)
from webui.engine.pipeline import Engine
from webui.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from webui.hookspecs import hookimpl
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest


@pytest.fixture(autouse=True)
def _hash_cache_in_tmp(tmp_path, monkeypatch):
    """Hashes computed by the engine go to this test's folder, not the user's cache."""
    monkeypatch.setenv("LATENT_STUDIO_CACHE_DIR", str(tmp_path / "cache"))


def touch(path: Path, data: bytes = b"not really weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def diffusers_folder(path: Path, *, controlnet: bool = False, **index: object) -> Path:
    """A folder that looks like a diffusers model to the listing (no weights: listing reads none)."""
    touch(path / "model_index.json", json.dumps({"_class_name": "StableDiffusionPipeline", **index}).encode())
    touch(path / "unet" / "diffusion_pytorch_model.safetensors")
    if controlnet:
        touch(path / "controlnet" / "config.json", b"{}")
    return path


def make_engine(models_dir: Path | None = None, *extra_plugins: object, **kwargs: object) -> Engine:
    plugins = make_plugin_manager(entry_points=False, plugin_dirs=[], extra=extra_plugins)
    return Engine(plugins=plugins, models_dir=None if models_dir is None else str(models_dir), **kwargs)


def listing(engine: Engine, kind: str | None = None) -> dict[tuple[str, str], str]:
    return {(e.kind, e.name): e.source for e in engine.models.list(kind)}


class Recorder:
    """A loader that takes any source and records what it was given (a stand-in for real loaders)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []

    @hookimpl(tryfirst=True)
    def load_model(self, source, kind, context):
        self.calls.append((source, kind, context.allow_paths))
        if kind == "checkpoint":
            return ModelBundle(
                name=Path(source).stem,
                unet=None,
                vae=None,
                text_encoders=[],
                tokenizers=[],
                scheduler_config={},
                source=source,
            )
        return object()


# -- our layout -----------------------------------------------------------------------------------


@pytest.fixture
def our_models(tmp_path) -> Path:
    root = tmp_path / "models"
    diffusers_folder(root / "my-sd15", controlnet=True)
    diffusers_folder(root / "checkpoints" / "diffusers-in-checkpoints")
    touch(root / "checkpoints" / "v1-5.safetensors")
    touch(root / "checkpoints" / "anime" / "flat.safetensors")
    touch(root / "checkpoints" / "old.ckpt")
    touch(root / "checkpoints" / "legacy.pt")
    touch(root / "checkpoints" / "v1-5.yaml")  # A1111's config beside a checkpoint: not a model
    touch(root / "checkpoints" / ".hidden.safetensors")
    touch(root / "vae" / "kl-f8.safetensors")
    touch(root / "vae" / "ema" / "mse.pt")
    touch(root / "vae" / "sdxl-vae" / "config.json", b"{}")
    touch(root / "vae" / "sdxl-vae" / "diffusion_pytorch_model.safetensors")
    touch(root / "controlnet" / "seg.safetensors")
    touch(root / "controlnet" / "sd-controlnet-seg" / "config.json", b"{}")
    touch(root / "controlnet" / "sd-controlnet-seg" / "diffusion_pytorch_model.safetensors")
    touch(root / "lora" / "detail.safetensors")
    touch(root / "lora" / "styles" / "ink.pt")
    touch(root / "lora" / "readme.txt")
    touch(root / "embeddings" / "bad-hands.safetensors")
    touch(root / "embeddings" / "easy.pt")
    touch(root / "embeddings" / "old.bin")
    return root


def test_every_kind_is_listed_with_subfolder_names(our_models):
    found = listing(make_engine(our_models))
    root = our_models
    assert found == {
        ("checkpoint", "my-sd15"): str(root / "my-sd15"),
        ("checkpoint", "checkpoints/diffusers-in-checkpoints"): str(
            root / "checkpoints" / "diffusers-in-checkpoints"
        ),
        ("checkpoint", "v1-5"): str(root / "checkpoints" / "v1-5.safetensors"),
        ("checkpoint", "anime/flat"): str(root / "checkpoints" / "anime" / "flat.safetensors"),
        ("checkpoint", "old"): str(root / "checkpoints" / "old.ckpt"),
        ("checkpoint", "legacy"): str(root / "checkpoints" / "legacy.pt"),
        ("vae", "kl-f8"): str(root / "vae" / "kl-f8.safetensors"),
        ("vae", "ema/mse"): str(root / "vae" / "ema" / "mse.pt"),
        ("vae", "sdxl-vae"): str(root / "vae" / "sdxl-vae"),
        ("controlnet", "my-sd15/controlnet"): str(root / "my-sd15" / "controlnet"),
        ("controlnet", "seg"): str(root / "controlnet" / "seg.safetensors"),
        ("controlnet", "sd-controlnet-seg"): str(root / "controlnet" / "sd-controlnet-seg"),
        ("lora", "detail"): str(root / "lora" / "detail.safetensors"),
        ("lora", "styles/ink"): str(root / "lora" / "styles" / "ink.pt"),
        ("embedding", "bad-hands"): str(root / "embeddings" / "bad-hands.safetensors"),
        ("embedding", "easy"): str(root / "embeddings" / "easy.pt"),
        ("embedding", "old"): str(root / "embeddings" / "old.bin"),
    }


def test_listing_by_kind_is_sorted_and_consistent(our_models):
    engine = make_engine(our_models)
    names = [e.name for e in engine.models.list("checkpoint")]
    assert names == sorted(names, key=str.lower)
    for kind in ("checkpoint", "vae", "controlnet", "lora", "embedding"):
        assert engine.models.list(kind) == [e for e in engine.models.list() if e.kind == kind]


def test_same_name_in_two_formats_keeps_the_extension_of_the_second(tmp_path):
    root = tmp_path / "models"
    touch(root / "checkpoints" / "model.ckpt")
    touch(root / "checkpoints" / "model.safetensors")
    found = listing(make_engine(root), "checkpoint")
    assert found == {
        ("checkpoint", "model"): str(root / "checkpoints" / "model.safetensors"),
        ("checkpoint", "model.ckpt"): str(root / "checkpoints" / "model.ckpt"),
    }


def test_listing_reads_no_weights(our_models, monkeypatch):
    import builtins

    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            raise AssertionError(f"the listing opened {file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(hashlib, "sha256", lambda *a: pytest.fail("the listing hashed a file"))
    assert len(make_engine(our_models).models.list()) == 17


def test_each_list_rescans(tmp_path):
    root = tmp_path / "models"
    engine = make_engine(root)
    assert engine.models.list() == []
    touch(root / "checkpoints" / "new.safetensors")
    touch(root / "lora" / "sub" / "fresh.safetensors")
    assert set(listing(engine)) == {("checkpoint", "new"), ("lora", "sub/fresh")}
    (root / "checkpoints" / "new.safetensors").unlink()
    assert set(listing(engine)) == {("lora", "sub/fresh")}


# -- A1111 and ComfyUI folders --------------------------------------------------------------------


@pytest.fixture
def a1111(tmp_path) -> Path:
    """An AUTOMATIC1111 installation's folders: ``models/`` and ``embeddings/`` beside it."""
    webui = tmp_path / "stable-diffusion-webui"
    models = webui / "models"
    touch(models / "Stable-diffusion" / "v1-5-pruned-emaonly.safetensors")
    touch(models / "Stable-diffusion" / "SDXL" / "juggernaut.safetensors")
    touch(models / "Stable-diffusion" / "v1-5-pruned-emaonly.vae.safetensors")  # A1111: a VAE, not a model
    touch(models / "VAE" / "vae-ft-mse-840000.safetensors")
    touch(models / "Lora" / "add_detail.safetensors")
    touch(models / "LyCORIS" / "loha-style.safetensors")
    touch(models / "ControlNet" / "control_v11p_sd15_seg.pth")
    touch(models / "ESRGAN" / "4x.pth")  # an upscaler (listed; loaded by engine.upscalers)
    touch(webui / "embeddings" / "EasyNegative.safetensors")
    touch(webui / "embeddings" / "sub" / "badhandv4.pt")
    return webui


A1111_EXPECTED = {
    ("checkpoint", "v1-5-pruned-emaonly"): "models/Stable-diffusion/v1-5-pruned-emaonly.safetensors",
    ("checkpoint", "SDXL/juggernaut"): "models/Stable-diffusion/SDXL/juggernaut.safetensors",
    ("vae", "v1-5-pruned-emaonly.vae"): "models/Stable-diffusion/v1-5-pruned-emaonly.vae.safetensors",
    ("vae", "vae-ft-mse-840000"): "models/VAE/vae-ft-mse-840000.safetensors",
    ("lora", "add_detail"): "models/Lora/add_detail.safetensors",
    ("lora", "loha-style"): "models/LyCORIS/loha-style.safetensors",
    ("controlnet", "control_v11p_sd15_seg"): "models/ControlNet/control_v11p_sd15_seg.pth",
    ("embedding", "EasyNegative"): "embeddings/EasyNegative.safetensors",
    ("embedding", "sub/badhandv4"): "embeddings/sub/badhandv4.pt",
    ("upscaler", "4x"): "models/ESRGAN/4x.pth",
}


@pytest.mark.parametrize("given", ["models", "install"])
def test_a1111_models_folder_as_models_dir(a1111, given):
    """``--models-dir`` at A1111's ``models`` folder, or at the installation itself."""
    engine = make_engine(a1111 / "models" if given == "models" else a1111)
    assert listing(engine) == {key: str(a1111 / rel) for key, rel in A1111_EXPECTED.items()}


def test_a1111_names_with_extensions_find_the_same_files(a1111):
    models = make_engine(a1111, allow_paths=False).models
    checkpoints = a1111 / "models" / "Stable-diffusion"
    assert models.source_of("SDXL/juggernaut.safetensors") == str(
        checkpoints / "SDXL" / "juggernaut.safetensors"
    )
    assert models.source_of("v1-5-pruned-emaonly.vae.safetensors", "vae") == str(
        checkpoints / "v1-5-pruned-emaonly.vae.safetensors"
    )
    assert models.source_of("sub/badhandv4.pt", "embedding") == str(
        a1111 / "embeddings" / "sub" / "badhandv4.pt"
    )
    with pytest.raises(ModelNotFoundError):
        models.source_of("v1-5-pruned-emaonly.vae.safetensors")  # a VAE is not a checkpoint
    with pytest.raises(ModelNotFoundError):
        models.source_of("v1-5-pruned-emaonly.safetensors", "vae")  # nor a checkpoint a VAE


def test_comfyui_folder_as_extra_models_dir(tmp_path, our_models):
    comfy = tmp_path / "ComfyUI" / "models"
    touch(comfy / "checkpoints" / "sdxl_base.safetensors")
    touch(comfy / "checkpoints" / "v1-5.safetensors")  # also in ours: ours comes first
    touch(comfy / "vae" / "sdxl_vae.safetensors")
    touch(comfy / "loras" / "pixel.safetensors")
    touch(comfy / "controlnet" / "canny.safetensors")
    touch(comfy / "embeddings" / "neg.pt")
    diffusers_folder(comfy / "diffusers" / "sd-turbo")
    engine = make_engine(our_models, extra_models_dirs=[tmp_path / "ComfyUI"])  # the install folder works too
    found = listing(engine)
    assert found[("checkpoint", "sdxl_base")] == str(comfy / "checkpoints" / "sdxl_base.safetensors")
    assert found[("checkpoint", "diffusers/sd-turbo")] == str(comfy / "diffusers" / "sd-turbo")
    assert found[("checkpoint", "v1-5")] == str(our_models / "checkpoints" / "v1-5.safetensors")
    assert found[("checkpoint", "v1-5.safetensors")] == str(comfy / "checkpoints" / "v1-5.safetensors")
    assert found[("vae", "sdxl_vae")] == str(comfy / "vae" / "sdxl_vae.safetensors")
    assert found[("lora", "pixel")] == str(comfy / "loras" / "pixel.safetensors")
    assert found[("controlnet", "canny")] == str(comfy / "controlnet" / "canny.safetensors")
    assert found[("embedding", "neg")] == str(comfy / "embeddings" / "neg.pt")
    checkpoints = [e.name for e in engine.models.list("checkpoint")]
    assert checkpoints.index("my-sd15") < checkpoints.index("sdxl_base")  # roots in order


def test_cli_flags_set_the_roots(tmp_path, a1111, monkeypatch):
    from webui import cli

    parser = cli.build_parser()
    ours = tmp_path / "ours"
    for argv in (
        ["--models-dir", str(ours), "--extra-models-dir", str(a1111 / "models"), "models"],
        ["models", "--models-dir", str(ours), "--extra-models-dir", str(a1111 / "models")],
    ):
        engine = cli._engine(parser.parse_args(argv))
        assert engine.models.folders.roots == (ours, a1111 / "models")
        assert engine.models.allow_paths  # the command line may name paths
    served = []
    monkeypatch.setattr("webui.ui.server.serve", lambda args, engine: served.append(engine))
    assert cli.main(["--models-dir", str(ours)]) == 0
    assert served[0].models.allow_paths is False  # the web server's engine takes names only


def test_plugins_see_every_root(tmp_path):
    seen = []

    class Lister:
        @hookimpl
        def register_models(self, register, models_dirs):
            seen.append(models_dirs)

    make_engine(tmp_path / "a", Lister(), extra_models_dirs=[tmp_path / "b"]).models.list()
    assert seen == [[str(tmp_path / "a"), str(tmp_path / "b")]]


# -- names from the web stay inside the folders ----------------------------------------------------


@pytest.fixture
def outside(tmp_path) -> Path:
    """A model folder and file outside the models root, which web names must never reach."""
    diffusers_folder(tmp_path / "outside" / "secret", vocabulary={"colour": ["leaked"]})
    return touch(tmp_path / "outside" / "secret.safetensors").parent


UNSAFE = {
    "parent": ("../outside/secret", "'..'"),
    "parent inside": ("checkpoints/../../outside/secret", "'..'"),
    "absolute": ("{outside}/secret", "absolute path"),
    "home": ("~/secret", "~"),
    "backslash": ("..\\outside\\secret", "backslash"),
    "drive": ("C:/models/secret", "absolute path"),
    "drive relative": ("C:secret", "drive"),
    "unc": ("//server/share/secret", "absolute path"),
    "nul": ("secret\x00.safetensors", "control characters"),
}


@pytest.mark.parametrize("form", list(UNSAFE))
def test_unsafe_names_are_refused_from_the_web(tmp_path, our_models, outside, form):
    name, reason = UNSAFE[form]
    name = name.format(outside=outside)
    recorder = Recorder()
    engine = make_engine(our_models, recorder, allow_paths=False)
    for call in (
        engine.models.get,
        engine.models.get_controlnet,
        lambda n: engine.models.source_of(n, "lora"),
        lambda n: engine.models.source_of(n, "vae"),
        lambda n: engine.generate(GenerationRequest(model=n, steps=1)),
    ):
        with pytest.raises(InvalidRequestError, match="not allowed") as info:
            call(name)
        assert reason in str(info.value)
    assert recorder.calls == []  # nothing reached a loader


def test_symlink_out_of_the_folders_is_refused_and_not_listed(our_models, outside):
    (our_models / "checkpoints" / "linked.safetensors").symlink_to(outside / "secret.safetensors")
    (our_models / "linked-folder").symlink_to(outside / "secret", target_is_directory=True)
    recorder = Recorder()
    engine = make_engine(our_models, recorder, allow_paths=False)
    names = {e.name for e in engine.models.list("checkpoint")}
    assert "linked" not in names and "linked-folder" not in names
    for name in ("linked", "linked.safetensors", "linked-folder"):
        with pytest.raises(InvalidRequestError, match="leads outside the model folders"):
            engine.models.get(name)
    assert recorder.calls == []


def test_symlinked_kind_folder_is_allowed(tmp_path):
    store = tmp_path / "big-disk" / "sd"
    touch(store / "deep" / "model.safetensors")
    root = tmp_path / "models"
    root.mkdir()
    (root / "checkpoints").symlink_to(store, target_is_directory=True)
    recorder = Recorder()
    engine = make_engine(root, recorder, allow_paths=False)
    assert [e.name for e in engine.models.list("checkpoint")] == ["deep/model"]
    engine.models.get("deep/model")
    assert recorder.calls == [(str(store / "deep" / "model.safetensors"), "checkpoint", False)]


def test_web_names_resolve_inside_the_folders(our_models):
    recorder = Recorder()
    engine = make_engine(our_models, recorder, allow_paths=False)
    engine.models.get("anime/flat")
    engine.models.get("anime/flat.safetensors")  # with its extension: the same file, not listed by that name
    engine.models.get_controlnet("sd-controlnet-seg")
    assert [c[0] for c in recorder.calls] == [
        str(our_models / "checkpoints" / "anime" / "flat.safetensors"),
        str(our_models / "controlnet" / "sd-controlnet-seg"),
    ]
    assert engine.models.source_of("styles/ink", "lora") == str(our_models / "lora" / "styles" / "ink.pt")
    assert engine.models.source_of("bad-hands", "embedding") == str(
        our_models / "embeddings" / "bad-hands.safetensors"
    )
    with pytest.raises(ModelNotFoundError, match="no lora named 'missing'"):
        engine.models.source_of("missing", "lora")
    with pytest.raises(ModelNotFoundError):
        engine.models.get("v1-5.yaml")  # a file in the folder, but not a model


def test_hub_ids_only_when_downloads_are_enabled(tmp_path, our_models, monkeypatch):
    engine = make_engine(our_models, allow_paths=False)
    assert engine.models.source_of("org/some-model") == "org/some-model"
    offline = make_engine(our_models, allow_paths=False, allow_download=False)
    with pytest.raises(ModelNotFoundError, match="downloads are not allowed|downloading it is not allowed"):
        offline.models.source_of("org/some-model")
    # a hub-shaped name that is a folder relative to the working directory is not taken as that folder
    diffusers_folder(tmp_path / "work" / "outside" / "model")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ModelNotFoundError, match="no checkpoint named 'outside/model'"):
        engine.models.source_of("outside/model")


def test_builtin_loader_never_tries_web_names_as_paths(tmp_path, our_models, monkeypatch):
    """Even asked directly, the built-in loader looks for a web name only inside models_dir."""
    import torch

    from webui.builtin import loaders
    from webui.engine.context import LoadContext

    diffusers_folder(tmp_path / "work" / "org" / "name")
    monkeypatch.chdir(tmp_path / "work")
    web = LoadContext(
        models_dir=str(our_models),
        device=torch.device("cpu"),
        dtype=torch.float32,
        allow_download=False,
        allow_paths=False,
    )
    with pytest.raises(ModelNotFoundError, match="downloads are not allowed|downloading it is not allowed"):
        loaders.load_model(source="org/name", kind="checkpoint", context=web)
    with pytest.raises(InvalidRequestError, match="not allowed"):
        loaders.load_model(source="../work/org/name", kind="checkpoint", context=web)
    cli = LoadContext(
        models_dir=str(our_models), device=torch.device("cpu"), dtype=torch.float32, allow_download=False
    )
    assert loaders._local_path("org/name", cli) == (tmp_path / "work" / "org" / "name").resolve()


def test_command_line_paths_stay_allowed(tmp_path, our_models, outside, monkeypatch):
    recorder = Recorder()
    # the web server's engine, started with --model pointing outside the folders
    engine = make_engine(our_models, recorder, allow_paths=False, default_model=str(outside / "secret"))
    engine.models.get(None)
    engine.models.get(str(outside / "secret"))  # the web sends back the listed default's name
    assert recorder.calls == [(str((outside / "secret").resolve()), "checkpoint", True)]
    assert ("checkpoint", str(outside / "secret")) in listing(engine)  # offered in the model picker
    # Python callers (allow_paths=True, the default) name any path: absolute, relative, ~
    recorder = Recorder()
    library = make_engine(our_models, recorder)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    names = (str(outside / "secret.safetensors"), "outside/secret", "~/outside/secret", "models/my-sd15")
    assert [library.models.source_of(name) for name in names] == [
        str(outside / "secret.safetensors"),
        str(outside / "secret"),
        str(outside / "secret"),
        str(our_models / "my-sd15"),
    ]
    library.models.get("~/outside/secret.safetensors")
    assert recorder.calls == [(str(outside / "secret.safetensors"), "checkpoint", True)]


def test_pickle_checkpoints_are_listed_and_refused_with_the_reason(our_models):
    engine = make_engine(our_models, allow_paths=False)
    with pytest.raises(ModelLoadError, match="pickle"):
        engine.models.get("old")


def test_check_name_and_resolve_in_root(tmp_path):
    assert check_name("sub/./name") == "sub/name"
    root = tmp_path / "lora"
    touch(root / "style.safetensors")
    touch(root / "style" / "notes.txt")
    touch(tmp_path / "elsewhere.pt")
    (root / "away.pt").symlink_to(tmp_path / "elsewhere.pt")
    # the file wins over a folder of the same name when an extension is given
    assert resolve_in_root(root, "style", suffixes=(".safetensors", ".pt")) == root / "style.safetensors"
    assert (
        resolve_in_root(root, "style.safetensors", suffixes=(".safetensors",)) == root / "style.safetensors"
    )
    assert resolve_in_root(root, "style") == root / "style"
    with pytest.raises(InvalidRequestError, match="leads outside"):
        resolve_in_root(root, "away", suffixes=(".pt",))
    assert resolve_in_root(root, "away", suffixes=(".pt",), allowed=[tmp_path]) == tmp_path / "elsewhere.pt"
    with pytest.raises(ModelNotFoundError, match="'nothing' not found"):
        resolve_in_root(root, "nothing", suffixes=(".pt",))
    with pytest.raises(InvalidRequestError, match="'..'"):
        resolve_in_root(root, "../elsewhere.pt")
    assert ModelFolders.of(tmp_path).find("style", "lora") == root / "style.safetensors"


# -- A1111's model hash -----------------------------------------------------------------------------


def test_model_hash_is_sha256_and_cached(tmp_path, monkeypatch):
    from webui.engine import folders

    weights = touch(tmp_path / "models" / "checkpoints" / "m.safetensors", os.urandom(3 * 1024 * 1024 + 7))
    cache = tmp_path / "hashes.json"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model_hash(weights, cache=cache) == expected[:10]
    record = json.loads(cache.read_text())["files"][str(weights.resolve())]
    stat = weights.stat()
    assert record == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected}
    assert [p.name for p in cache.parent.iterdir() if p.name.startswith(".hashes")] == []  # no temporary left

    # served from the cache: a value planted there comes back, and the file is not read
    planted = json.loads(cache.read_text())
    planted["files"][str(weights.resolve())]["sha256"] = "ab" * 32
    cache.write_text(json.dumps(planted))
    monkeypatch.setattr(folders, "file_sha256", lambda *a, **k: pytest.fail("hashed again"))
    assert model_hash(weights, cache=cache) == "ababababab"
    monkeypatch.undo()

    # a new modification time, or a new size, is hashed again
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_hash(weights, cache=cache) == expected[:10]
    with open(weights, "ab") as handle:
        handle.write(b"more")
    assert model_hash(weights, cache=cache) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    assert json.loads(cache.read_text())["files"][str(weights.resolve())]["size"] == stat.st_size + 4


def test_hash_cache_survives_damage_and_forgets_deleted_files(tmp_path):
    cache = tmp_path / "cache" / "hashes.json"
    a = touch(tmp_path / "a.safetensors", b"a")
    b = touch(tmp_path / "b.safetensors", b"b")
    cache.parent.mkdir()
    cache.write_text("{not json")
    assert model_hash(a, cache=cache) == hashlib.sha256(b"a").hexdigest()[:10]
    model_hash(b, cache=cache)
    a.unlink()
    touch(tmp_path / "c.safetensors", b"c")
    model_hash(tmp_path / "c.safetensors", cache=cache)
    assert set(json.loads(cache.read_text())["files"]) == {
        str(b.resolve()),
        str((tmp_path / "c.safetensors").resolve()),
    }
    with pytest.raises(ModelNotFoundError, match="cannot hash"):
        model_hash(a, cache=cache)


def test_default_hash_cache_location(tmp_path):
    weights = touch(tmp_path / "w.safetensors", b"w")
    assert default_cache_dir() == tmp_path / "cache"  # from LATENT_STUDIO_CACHE_DIR (the autouse fixture)
    model_hash(weights)
    assert str(weights.resolve()) in json.loads((tmp_path / "cache" / HASH_CACHE_NAME).read_text())["files"]


def test_single_file_checkpoint_gets_the_hash_in_its_infotext(tmp_path):
    from fixtures_models import tiny_bundle

    weights = touch(tmp_path / "models" / "checkpoints" / "tiny-single.safetensors", os.urandom(4096))
    built = tiny_bundle(tmp_path / "tok")
    built.model_hash = None  # as a single-file loader leaves it

    class SingleFile:
        @hookimpl(tryfirst=True)
        def load_model(self, source, kind, context):
            return built if source == str(weights) else None

    engine = make_engine(tmp_path / "models", SingleFile(), allow_paths=False)
    result = engine.generate(
        GenerationRequest(
            model="tiny-single", prompt="a red circle", steps=1, seed=1, width=64, height=64, sampler="Euler"
        )
    )
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    assert built.model_hash == expected
    assert f"Model hash: {expected}," in result.infotexts[0]
    assert (
        expected
        == json.loads((tmp_path / "cache" / HASH_CACHE_NAME).read_text())["files"][str(weights.resolve())][
            "sha256"
        ][:10]
    )


# -- the web UI's model picker ----------------------------------------------------------------------


def test_ui_model_picker_lists_single_files(tmp_path, our_models, outside):
    from webui.ui.service import StudioService

    engine = make_engine(our_models, allow_paths=False)
    service = StudioService(engine, tmp_path / "outputs")
    names = service.model_names()
    assert names == [e.name for e in engine.models.list("checkpoint")]
    assert {"v1-5", "anime/flat", "my-sd15", "old"} <= set(names)
    touch(our_models / "checkpoints" / "added-later.safetensors")
    assert "added-later" in service.model_names()  # refresh sees new files
    assert service.model_info("v1-5").name == "v1-5"  # a single file: no folder to read, defaults
    leaked = service.model_info(str(outside / "secret"))  # a path from the browser is not followed
    assert leaked.vocabulary == {}
