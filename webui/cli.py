"""Command line: ``python launch.py`` starts the web app; ``python launch.py COMMAND`` runs
``generate``, ``plugins``, ``samplers``, ``models``, ``train`` or ``evaluate``.

Errors caused by input print one line (``error: ...``) to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from webui.errors import InvalidRequestError, LatentStudioError
from webui.limits import Limits, add_limit_options
from webui.plugins import REPO_ROOT

DEFAULT_MODELS_DIR = REPO_ROOT / "models"
DEFAULT_OUTPUTS_DIR = REPO_ROOT / "outputs"
DTYPES = ("auto", "fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description="Latent Studio: latent-diffusion image generation")
    from webui.ui.server import add_server_options

    add_server_options(parser)
    parser.add_argument("--model", default=None, help="model to start with: folder, name under --models-dir, or "
                        "Hugging Face id (default: the shipped latent-studio-shapes)")
    _models_dir_options(parser)
    _allow_pickle_option(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="auto: fp16 on GPUs; on CPUs with native bf16, bf16 for big models; else fp32")
    _memory_options(parser)
    add_limit_options(parser)
    parser.add_argument("--allow-download", action="store_true",
                        help="let the web app and its API download models named by a Hugging Face id "
                        "(off: only models on disk; `generate` may always download the model it is given)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate images without the web UI")
    gen.add_argument("--task", choices=("txt2img", "img2img", "inpaint", "seg2img"), default=None,
                     help="default: derived from the images given")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=-1, help="-1 = random; image k of a batch uses seed + k")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--cfg-scale", type=float, default=None, help="default: the model's (7 unless it says)")
    gen.add_argument("--sampler", default="DPM++ 2M Karras", help="see `launch.py samplers`")
    gen.add_argument("--width", type=int, default=None, help="multiple of 8; default: the model's native size")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--batch-size", type=int, default=1, help="images per batch")
    gen.add_argument("--batch-count", type=int, default=1, help="batches, one after the other")
    gen.add_argument("--clip-skip", type=int, default=1)
    gen.add_argument("--init-image", type=Path, help="img2img / inpaint: the image to start from")
    gen.add_argument("--strength", type=float, default=None, help="denoising strength in [0, 1] "
                     "(default 0.75 for img2img, 1.0 for inpainting)")
    gen.add_argument("--mask", type=Path, help="inpaint: white = repaint; resized to the image if needed")
    gen.add_argument("--mask-blur", type=int, default=4)
    gen.add_argument("--invert-mask", action="store_true")
    gen.add_argument("--masked-content", choices=("original", "fill", "latent noise", "latent nothing"),
                     default="original")
    gen.add_argument("--only-masked", action="store_true", help="inpaint the masked region at full resolution")
    gen.add_argument("--only-masked-padding", type=int, default=32)
    gen.add_argument("--seg-map", type=Path, help="seg2img: a colour-coded segmentation map")
    gen.add_argument("--controlnet", default=None, help="ControlNet folder or name for the segmentation map")
    gen.add_argument("--control-scale", type=float, default=1.0)
    gen.add_argument("--control-start", type=float, default=0.0)
    gen.add_argument("--control-end", type=float, default=1.0)
    _model_options(gen)
    add_limit_options(gen, keep=True)
    gen.add_argument("--out", type=Path, default=DEFAULT_OUTPUTS_DIR, help="output folder (created if missing)")

    train = commands.add_parser("train", help="train the default shapes model (resumable)")
    train.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR / "latent-studio-shapes")
    train.add_argument("--checkpoint-dir", type=Path, default=REPO_ROOT / "checkpoints" / "latent-studio-shapes",
                       help="checkpoints and log.jsonl; an interrupted run resumes from here")
    train.add_argument("--steps", type=_at_least(0), default=None, help="diffusion steps (default: the recipe's)")
    train.add_argument("--refine-steps", type=_at_least(0), default=None,
                       help="v-prediction refinement steps after the diffusion phase (default: the recipe's 3000; 0 = none)")
    train.add_argument("--polish-steps", type=_at_least(0), default=None,
                       help="polish steps after the refinement (default: the recipe's; 0 skips it)")
    train.add_argument("--vae-steps", type=_at_least(0), default=None)
    train.add_argument("--batch-size", type=_at_least(1), default=None)
    train.add_argument("--scenes", type=_at_least(1), default=None, help="size of the training pool")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--threads", type=_at_least(1), default=None, help="CPU threads for torch (default: all cores)")

    ev = commands.add_parser("evaluate", help="score a shapes model on txt2img, seg2img, inpainting, img2img")
    ev.add_argument("--n", type=_at_least(1), default=100, help="images per task")
    ev.add_argument("--seed", type=int, default=12345, help="scene seed (training uses seeds under 10000)")
    ev.add_argument("--steps", type=_at_least(1), default=20)
    ev.add_argument("--cfg-scale", type=float, default=None, help="default: the model's recommended guidance")
    ev.add_argument("--batch-size", type=_at_least(1), default=4, help="images per request (one scene each)")
    ev.add_argument("--json", type=Path, default=None, help="also write the scores as JSON here")
    _model_options(ev)

    commands.add_parser("plugins", help="list installed plugins as JSON")
    commands.add_parser("samplers", help="list the available samplers")
    models = commands.add_parser("models", help="list the models found")
    _model_options(models)
    return parser


def _at_least(low: int) -> Any:
    """An argparse type: a whole number >= ``low`` (argparse prints the one-line message, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "number"
    return parse


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The model options again on a command, so they may follow it. Their defaults are the main
    parser's (SUPPRESS here), so ``launch.py --models-dir D models`` keeps ``D``."""
    keep = argparse.SUPPRESS
    parser.add_argument("--model", default=keep, help="model folder, name under --models-dir, or Hugging Face id")
    _models_dir_options(parser, default=keep)
    _allow_pickle_option(parser, default=keep)
    parser.add_argument("--device", default=keep, help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, default=keep)
    _memory_options(parser, keep=True)


def _models_dir_options(parser: argparse.ArgumentParser, *, default: Any = None) -> None:
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR if default is None else default,
                        help="models root: diffusers folders anywhere in it, files in checkpoints/, vae/, "
                        "controlnet/, lora/, embeddings/ (an A1111 or ComfyUI models folder works as it is)")
    parser.add_argument("--extra-models-dir", type=Path, action="append", default=[] if default is None else default,
                        metavar="DIR", help="another models root, searched after --models-dir (repeatable), e.g. "
                        "~/stable-diffusion-webui/models or ~/ComfyUI/models")


def _memory_options(parser: argparse.ArgumentParser, *, keep: bool = False) -> None:
    """Memory and speed levers (webui.engine.memory). With ``keep`` their defaults are SUPPRESS, so
    a value given before the subcommand is not overwritten."""
    from webui.engine.memory import ATTENTION_BACKENDS, OFFLOAD_MODES, SWITCHES

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if keep else value

    group = parser.add_argument_group("memory and speed")
    group.add_argument("--attention", choices=ATTENTION_BACKENDS, default=default("sdpa"),
                       help="sdpa: PyTorch's scaled_dot_product_attention; xformers: GPU, needs the package "
                       "(falls back to sdpa with a warning); sliced: one head at a time")
    group.add_argument("--vae-slicing", choices=SWITCHES, default=default("auto"),
                       help="decode a batch one image at a time (auto: when memory is short)")
    group.add_argument("--vae-tiling", choices=SWITCHES, default=default("auto"),
                       help="encode and decode in overlapping tiles (auto: when the size needs it)")
    group.add_argument("--offload", choices=OFFLOAD_MODES, default=default("auto"),
                       help="GPU only. model: each model on the GPU only while it runs (A1111's --medvram); "
                       "sequential: layer by layer, slowest, least memory (--lowvram); auto: when memory is short")
    group.add_argument("--medvram", dest="offload", action="store_const", const="model", default=default("auto"),
                       help="the same as --offload model")
    group.add_argument("--lowvram", dest="offload", action="store_const", const="sequential",
                       default=default("auto"), help="the same as --offload sequential")
    group.add_argument("--channels-last", action="store_true", default=default(False),
                       help="convolution weights in channels-last layout")
    group.add_argument("--no-oom-retry", dest="oom_retry", action="store_false", default=default(True),
                       help="fail instead of retrying a batch that ran out of memory with a lower-memory plan")


def memory_settings(args: argparse.Namespace) -> Any:
    from webui.engine.memory import MemorySettings

    return MemorySettings(attention=args.attention, vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling,
                          offload=args.offload, channels_last=args.channels_last, recover=args.oom_retry)


def _allow_pickle_option(parser: argparse.ArgumentParser, *, default: Any = False) -> None:
    parser.add_argument("--allow-pickle", action="store_true", default=default,
                        help="also load pickle checkpoints (.ckpt, .pt, .pth, .bin). Unpickling can run code "
                        "hidden in a file, so only use this for files you trust; they are read with "
                        "torch.load(weights_only=True)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            return _serve(args)
        if args.command == "plugins":
            return _plugins()
        if args.command == "samplers":
            return _samplers()
        if args.command == "models":
            return _models(args)
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        return _generate(args)
    except LatentStudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _serve(args: argparse.Namespace) -> int:
    from webui.ui.server import serve

    # refuses unsafe flags before building anything (no model is loaded yet); the web's model names
    # may not be paths (--model, given here, still may)
    serve(args, _engine(args, allow_paths=False, allow_download=args.allow_download))
    return 0


def _plugins() -> int:
    from webui.plugins import make_plugin_manager

    print(json.dumps(make_plugin_manager().describe(), indent=2))
    return 0


def _samplers() -> int:
    from webui.engine.pipeline import Engine

    for name in Engine().schedulers.names():
        print(name)
    return 0


def _engine(args: argparse.Namespace, *, allow_paths: bool = True, allow_download: bool = True) -> Any:
    from webui.engine.devices import pick_device, pick_dtype
    from webui.engine.pipeline import Engine

    _quiet_libraries()
    device = pick_device(args.device)
    dtype = "auto" if args.dtype == "auto" else pick_dtype(args.dtype, device)
    return Engine(models_dir=str(args.models_dir), default_model=args.model, device=device,
                  dtype=dtype, extra_models_dirs=args.extra_models_dir, memory=memory_settings(args),
                  allow_paths=allow_paths, allow_pickle=getattr(args, "allow_pickle", False),
                  allow_download=allow_download, limits=Limits.from_args(args))


def _quiet_libraries() -> None:
    """Silence the libraries' progress bars and advisory warnings while models load: on stderr they
    would bury the one ``error:`` line (or be the only output of a successful run). Real errors
    still show."""
    import importlib

    for library in ("diffusers", "transformers"):
        try:
            library_logging = importlib.import_module(f"{library}.utils.logging")
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()


def _train(args: argparse.Namespace) -> int:
    from webui.training.train import TrainConfig, train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = TrainConfig(seed=args.seed)
    for option, name in (("steps", "steps"), ("refine_steps", "refine_steps"), ("polish_steps", "polish_steps"),
                         ("vae_steps", "vae_steps"),
                         ("batch_size", "batch"),
                         ("scenes", "scenes")):
        if getattr(args, option) is not None:
            setattr(config, name, getattr(args, option))
    print(train(args.out, args.checkpoint_dir, config, device=args.device))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from webui.training.evaluate import evaluate, format_table

    scores = evaluate(_engine(args), args.model, seed=args.seed, n=args.n, steps=args.steps, cfg_scale=args.cfg_scale,
                      batch_size=args.batch_size, progress=lambda line: print(line, file=sys.stderr))
    print(format_table(scores))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def _models(args: argparse.Namespace) -> int:
    for entry in _engine(args).models.list():
        print(json.dumps({"name": entry.name, "kind": entry.kind, "source": entry.source}))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from webui.output import BatchSaver, check_writable, output_dir
    from webui.request import GenerationRequest

    init = _open(args.init_image, "init image")
    mask = _open(args.mask, "mask")
    seg = _open(args.seg_map, "segmentation map")
    task = args.task or ("inpaint" if mask else "seg2img" if seg and not init else "img2img" if init else "txt2img")
    strength = args.strength if args.strength is not None else (1.0 if task == "inpaint" else 0.75)
    request = GenerationRequest(
        task=task, prompt=args.prompt, negative_prompt=args.negative_prompt, model=args.model,
        sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
        width=args.width, height=args.height, batch_size=args.batch_size, batch_count=args.batch_count,
        clip_skip=args.clip_skip, init_image=init, strength=strength, mask=mask, mask_blur=args.mask_blur,
        invert_mask=args.invert_mask, masked_content=args.masked_content, only_masked=args.only_masked,
        only_masked_padding=args.only_masked_padding, seg_map=seg, controlnet=args.controlnet,
        control_scale=args.control_scale, control_start=args.control_start, control_end=args.control_end,
    )
    request.validate()  # fail fast on bad input, before a model is loaded
    problem = check_writable(args.out)
    if problem:
        raise InvalidRequestError(f"--out {problem}")
    engine = _engine(args)
    # each batch is saved (and its paths printed) as soon as it is decoded: a later failure, Ctrl+C
    # or a crash keeps it; a failure to save does not stop the run, it is reported at the end (exit 2)
    saver = BatchSaver(output_dir(args.out, task), report=lambda path: print(path, flush=True))
    try:
        result = engine.generate(request, on_batch=saver)
    except LatentStudioError as error:
        note = saver.summary()
        if note is None:
            raise
        raise LatentStudioError(f"{error} ({note})") from error
    except BaseException:
        note = saver.summary()
        if note is not None:
            print(note, file=sys.stderr, flush=True)
        raise
    saver.finish(result.images)
    warning = saver.warning()
    if warning is not None:
        print(f"error: {warning}", file=sys.stderr)
        return 2
    return 0


def _open(path: Path | None, what: str) -> Any:
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    from webui.images import MAX_PIXELS, check_pixels

    if not path.is_file():
        raise InvalidRequestError(f"{what} not found: {path}")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow refuses bigger images (decompression bombs) at open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_pixels(*image.size, f"{what} {path}")  # from the header, before decoding
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{what} {path} is too large to open safely: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequestError(f"cannot read {what} {path}: {exc}") from None
