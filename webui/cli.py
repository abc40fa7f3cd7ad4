"""Command line: ``python launch.py`` starts the web app; ``python launch.py COMMAND`` runs
``generate``, ``plugins``, ``samplers``, ``models``, ``upscalers``, ``upscale``, ``train`` or
``evaluate``.

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

from webui import paths
from webui.errors import InvalidRequestError, LatentStudioError
from webui.limits import Limits, add_limit_options, at_least

# the data folder's (webui.paths: the checkout, or the user's folder when installed); --data-dir moves them
DEFAULT_MODELS_DIR = paths.models_dir()
DEFAULT_OUTPUTS_DIR = paths.outputs_dir()
DTYPES = ("auto", "fp32", "fp16", "bf16")


# the training recipe's phases after the diffusion phase that an option shortens, lengthens or
# skips: the option's (and TrainConfig's) name, and what the steps are
TRAIN_PHASE_LENGTHS = (
    ("refine_steps", "v-prediction refinement steps after the diffusion phase"),
    ("polish_steps", "polish steps after the refinement"),
    ("phrasing_steps", "steps on pairs and free phrasings after the polish"),
    ("phrasing_polish_steps", "polish steps after the phrasing phase"),
    (
        "template_polish_steps",
        "polish steps with every caption in the caption template, after the phrasing phases",
    ),
    (
        "shape_polish_steps",
        "polish steps with the loss weighted towards the shapes, after the template polish",
    ),
    ("decoder_steps", "steps on the VAE's decoder alone after the polishes"),
)


def build_parser(fields: Any = None) -> argparse.ArgumentParser:
    """The command line. ``fields`` (a :class:`~webui.fields.FieldRegistry`, default: the built-in
    fields) gives ``generate`` one flag per field."""
    parser = argparse.ArgumentParser(
        prog="launch.py", allow_abbrev=False, description="Latent Studio: latent-diffusion image generation"
    )
    from webui.ui.server import add_server_options

    add_server_options(parser)
    from webui.serve.options import add_ray_options

    add_ray_options(parser)
    parser.add_argument(
        "--model",
        default=None,
        help="model to start with: folder, name under --models-dir, or "
        "Hugging Face id (default: the shipped latent-studio-shapes)",
    )
    _models_dir_options(parser)
    _allow_pickle_option(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: fp16 on GPUs; on CPUs with native bf16, bf16 for big models; else fp32",
    )
    _memory_options(parser)
    add_limit_options(parser)
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="let the web app and its API download models named by a Hugging Face id "
        "(off: only models on disk; `generate` may always download the model it is given)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        help="generate images without the web UI",
        description="Every request field has a flag (plugins' fields too, when installed); "
        "--set NAME=VALUE sets any field by its name.",
    )
    _model_options(gen)
    add_limit_options(gen, keep=True)
    gen.add_argument(
        "--out", type=Path, default=DEFAULT_OUTPUTS_DIR, help="output folder (created if missing)"
    )
    plot = gen.add_argument_group(
        "X/Y/Z plot", "sweep up to three parameters and save a labelled grid with the images"
    )
    for axis in ("x", "y", "z"):
        plot.add_argument(
            f"--{axis}",
            dest=f"plot_{axis}",
            default=None,
            metavar="TYPE=VALUES",
            help='e.g. --x "steps=4,8", --y "cfg_scale=3-7 (+2)", --z "Prompt S/R=cat,dog" (any field by name)'
            if axis == "x"
            else None,
        )
    plot.add_argument("--no-legend", action="store_true", help="draw the grid without axis labels")
    plot.add_argument("--keep-random-seeds", action="store_true", help="a seed of -1 is random in every cell")
    add_field_options(gen, fields)  # after the fixed options: a plugin field never takes one of their names

    train = commands.add_parser("train", help="train the default shapes model (resumable)")
    train.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR / "latent-studio-shapes")
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=paths.data_dir() / "checkpoints" / "latent-studio-shapes",
        help="checkpoints and log.jsonl; an interrupted run resumes from here",
    )
    train.add_argument(
        "--steps", type=at_least(0), default=None, help="diffusion steps (default: the recipe's)"
    )
    for name, what in TRAIN_PHASE_LENGTHS:
        train.add_argument(
            f"--{name.replace('_', '-')}",
            type=at_least(0),
            default=None,
            help=f"{what} (default: the recipe's; 0 skips it)",
        )
    train.add_argument(
        "--reader-steps",
        type=at_least(0),
        default=None,
        help="prompt reader steps after the export (default: the recipe's; 0 trains none and keeps "
        "the --init-from folder's reader)",
    )
    train.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a model folder of this recipe (after its polish) to start phases 5-9 from, instead of "
        "training phases 1-4",
    )
    train.add_argument(
        "--hours",
        type=_positive_hours,
        default=None,
        help="stop at the first checkpoint after this many hours; the same command again continues",
    )
    train.add_argument("--vae-steps", type=at_least(0), default=None)
    train.add_argument("--batch-size", type=at_least(1), default=None)
    train.add_argument("--scenes", type=at_least(1), default=None, help="size of the training pool")
    train.add_argument(
        "--pair-share",
        type=_share,
        default=None,
        help="share of the phrasing phases' pool showing two shapes, one beside or above the other "
        "(default: the recipe's)",
    )
    train.add_argument(
        "--phrasing-share",
        type=_share,
        default=None,
        help="share of the phrasing phases' captions in free phrasing instead of the caption template "
        "(default: the recipe's)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument(
        "--threads", type=at_least(1), default=None, help="CPU threads for torch (default: all cores)"
    )

    ev = commands.add_parser("evaluate", help="score a shapes model on txt2img, seg2img, inpainting, img2img")
    ev.add_argument("--n", type=at_least(1), default=100, help="images per task")
    ev.add_argument(
        "--seed",
        type=int,
        default=12345,
        help="scene seed (each task draws its scenes from its own stream derived from it)",
    )
    ev.add_argument("--steps", type=at_least(1), default=20)
    ev.add_argument(
        "--sampler", default="DPM++ 2M Karras", help="the sampler of every request (see `launch.py samplers`)"
    )
    ev.add_argument("--cfg-scale", type=float, default=None, help="default: the model's recommended guidance")
    ev.add_argument("--batch-size", type=at_least(1), default=4, help="images per request (one scene each)")
    ev.add_argument("--json", type=Path, default=None, help="also write the scores as JSON here")
    ev.add_argument(
        "--tasks",
        type=_task_list,
        default=None,
        help="comma-separated tasks to run (default: all): txt2img, seg2img, inpaint, img2img, phrased, "
        "held_out, pair_phrased, pair_held_out, pair_seg2img",
    )
    ev.add_argument(
        "--sheet",
        type=Path,
        default=None,
        help="also draw a PNG sheet of the held-out prompts' images (one and two objects), framed by verdict",
    )
    ev.add_argument("--sheet-count", type=at_least(1), default=12, help="images per task on the sheet")
    _model_options(ev)

    from webui.plugin_admin import add_plugins_parser

    add_plugins_parser(commands)
    commands.add_parser("samplers", help="list the available samplers")
    upscalers = commands.add_parser(
        "upscalers", help="list the image upscalers (Lanczos, Nearest, model files)"
    )
    _model_options(upscalers)
    upscale = commands.add_parser(
        "upscale",
        help="upscale images (as the web app's Extras tab)",
        description="Each image is saved as a PNG with its parameters text kept and the upscale noted.",
    )
    upscale.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files")
    upscale.add_argument("--upscaler", required=True, help="a name `launch.py upscalers` lists")
    how = upscale.add_mutually_exclusive_group(required=True)
    how.add_argument("--scale", type=float, help="times the image's size, e.g. 2")
    how.add_argument("--size", help="WIDTHxHEIGHT: scaled to cover it (aspect kept), see --crop")
    upscale.add_argument(
        "--crop", action="store_true", help="with --size: cut the centre to exactly that size"
    )
    upscale.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder for the images (default: the outputs folder's extras/<date>/)",
    )
    _model_options(upscale)
    add_limit_options(upscale, keep=True)
    models = commands.add_parser("models", help="list the models found")
    _model_options(models)
    return parser


def add_field_options(parser: argparse.ArgumentParser, fields: Any = None) -> None:
    """``--task``, ``--set NAME=VALUE`` and one flag per request field of ``fields`` (its name with
    dashes: ``--cfg-rescale``), all defaulting to "not given" (the field's default for the task).
    Values are read by the field's own parser after argparse (one ``error:`` line for a bad one); a
    flag that would clash with another option is left out (``--set`` still reaches the field)."""
    from webui.fields import FieldRegistry

    fields = fields if fields is not None else FieldRegistry.builtin()
    parser.add_argument(
        "--task",
        default=None,
        help=f"one of {', '.join(fields.tasks)}; default: derived from the "
        "images given (inpaint with a mask, seg2img with only a segmentation map, img2img with an image)",
    )
    parser.add_argument(
        "--set",
        dest="field_values",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set any request field by name, e.g. --set cfg_rescale=0.7 (repeatable; "
        "`launch.py generate --help` lists the fields as flags)",
    )
    for declared in fields:
        if not declared.cli:
            continue
        options: dict[str, Any] = {
            "dest": f"field:{declared.name}",
            "default": None,
            "help": declared.describe(),
        }
        if declared.kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif declared.multiple:  # --styles A --styles B
            options["action"] = "append"
            options["metavar"] = "NAME"
        else:
            options["metavar"] = "PATH" if declared.kind == "image" else declared.kind.upper()
            if declared.fixed_choices:
                options["metavar"] = "{" + ",".join(declared.fixed_choices) + "}"
        try:
            parser.add_argument(declared.flag, **options)
        except argparse.ArgumentError:  # e.g. a plugin field called "out": --set out=... still works
            continue


def field_values(args: argparse.Namespace, fields: Any) -> dict[str, Any]:
    """The fields given on the command line (flags, then ``--set`` entries, which win), read by
    each field's parser; image fields stay paths. Raises InvalidRequestError for a bad value or an
    unknown field name."""
    given: dict[str, Any] = {}
    for declared in fields:
        value = getattr(args, f"field:{declared.name}", None)
        if value is not None:
            given[declared.name] = value
    for entry in getattr(args, "field_values", []) or []:
        name, equals, text = str(entry).partition("=")
        if not equals:
            raise InvalidRequestError(
                f"--set {str(entry)[:100]!r}: write NAME=VALUE, e.g. --set cfg_rescale=0.7"
            )
        given[fields.field(name.strip()).name] = text
    values: dict[str, Any] = {}
    for name, value in given.items():
        declared = fields[name]
        values[name] = value if isinstance(value, bool) else declared.parse(value)
    return values


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The model options again on a command, so they may follow it. Their defaults are the main
    parser's (SUPPRESS here), so ``launch.py --models-dir D models`` keeps ``D``."""
    keep = argparse.SUPPRESS
    parser.add_argument(
        "--model", default=keep, help="model folder, name under --models-dir, or Hugging Face id"
    )
    _models_dir_options(parser, default=keep)
    _allow_pickle_option(parser, default=keep)
    parser.add_argument("--device", default=keep, help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, default=keep)
    _memory_options(parser, keep=True)


def _models_dir_options(parser: argparse.ArgumentParser, *, default: Any = None) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        action=_DataDirAction,
        default=default,
        metavar="DIR",
        help="the data folder: models/, outputs/, plugins/ and the plugin settings (default: the "
        "checkout; installed: ~/.local/share/latent-studio, or $XDG_DATA_HOME/latent-studio)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=DEFAULT_MODELS_DIR if default is None else default,
        help="models root: diffusers folders anywhere in it, files in checkpoints/, vae/, "
        "controlnet/, lora/, embeddings/ (an A1111 or ComfyUI models folder works as it is)",
    )
    parser.add_argument(
        "--extra-models-dir",
        type=Path,
        action="append",
        default=[] if default is None else default,
        metavar="DIR",
        help="another models root, searched after --models-dir (repeatable), e.g. "
        "~/stable-diffusion-webui/models or ~/ComfyUI/models",
    )


class _DataDirAction(argparse.Action):
    """``--data-dir``: checked, then set in ``$LATENT_STUDIO_DATA_DIR`` at once (see :mod:`webui.paths`),
    so the drop-in plugins found while parsing, a restarted server and child processes all use it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        try:
            setattr(namespace, self.dest, paths.use_data_dir(values))
        except ValueError as error:  # one line and status 2, like every input error (no usage dump)
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None


def _data_folder(args: argparse.Namespace) -> None:
    """The folders left at their defaults follow ``--data-dir``; the shipped model is copied into the
    data folder's ``models/`` when it is missing there (an installed package's first run)."""
    if getattr(args, "data_dir", None) is not None:
        if args.models_dir is DEFAULT_MODELS_DIR:
            args.models_dir = paths.models_dir()
        if getattr(args, "out", None) is DEFAULT_OUTPUTS_DIR:
            args.out = paths.outputs_dir()
        if hasattr(args, "outputs_dir") and args.outputs_dir is None:
            args.outputs_dir = paths.outputs_dir()
    if args.command not in ("plugins", "samplers", "train"):
        problem = paths.install_shipped_model(args.models_dir)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)


def _memory_options(parser: argparse.ArgumentParser, *, keep: bool = False) -> None:
    """Memory and speed levers (webui.engine.memory). With ``keep`` their defaults are SUPPRESS, so
    a value given before the subcommand is not overwritten."""
    from webui.engine.memory import ATTENTION_BACKENDS, OFFLOAD_MODES, SWITCHES

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if keep else value

    group = parser.add_argument_group("memory and speed")
    group.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default=default("sdpa"),
        help="sdpa: PyTorch's scaled_dot_product_attention; xformers: GPU, needs the package "
        "(falls back to sdpa with a warning); sliced: one head at a time",
    )
    group.add_argument(
        "--vae-slicing",
        choices=SWITCHES,
        default=default("auto"),
        help="decode a batch one image at a time (auto: when memory is short)",
    )
    group.add_argument(
        "--vae-tiling",
        choices=SWITCHES,
        default=default("auto"),
        help="encode and decode in overlapping tiles (auto: when the size needs it)",
    )
    group.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default=default("auto"),
        help="GPU only. model: each model on the GPU only while it runs (A1111's --medvram); "
        "sequential: layer by layer, slowest, least memory (--lowvram); auto: when memory is short",
    )
    group.add_argument(
        "--medvram",
        dest="offload",
        action="store_const",
        const="model",
        default=default("auto"),
        help="the same as --offload model",
    )
    group.add_argument(
        "--lowvram",
        dest="offload",
        action="store_const",
        const="sequential",
        default=default("auto"),
        help="the same as --offload sequential",
    )
    group.add_argument(
        "--channels-last",
        action="store_true",
        default=default(False),
        help="convolution weights in channels-last layout",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        default=default(False),
        help="run the UNet through torch.compile: faster steps; the first image at each size compiles "
        "first (minutes on a CPU; cached on disk for the next start). Needs a C++ compiler (CPU) or "
        "Triton (GPU); falls back to the uncompiled UNet with a warning",
    )
    group.add_argument(
        "--no-cpu-kernels",
        dest="cpu_kernels",
        action="store_false",
        default=default(True),
        help="run models on the CPU with PyTorch's own kernels only (by default SD-size UNets run "
        "float32 linear layers, GEGLU and, with --channels-last, the deepest 3x3 convolutions through "
        "faster exact oneDNN routes, bfloat16 attention through a kernel of our own on CPUs with "
        "AVX-512 BF16, and the identical halves of a CFG batch once)",
    )
    group.add_argument(
        "--no-oom-retry",
        dest="oom_retry",
        action="store_false",
        default=default(True),
        help="fail instead of retrying a batch that ran out of memory with a lower-memory plan",
    )


def memory_settings(args: argparse.Namespace) -> Any:
    from webui.engine.memory import MemorySettings

    return MemorySettings(
        attention=args.attention,
        vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling,
        offload=args.offload,
        channels_last=args.channels_last,
        recover=args.oom_retry,
        compile=args.compile,
        cpu_kernels=args.cpu_kernels,
    )


def _allow_pickle_option(parser: argparse.ArgumentParser, *, default: Any = False) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        default=default,
        help="also load pickle checkpoints (.ckpt, .pt, .pth, .bin). Unpickling can run code "
        "hidden in a file, so only use this for files you trust; they are read with "
        "torch.load(weights_only=True)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # first pass: which command? (``generate``'s flags come from the installed plugins' fields)
    first, _ = build_parser().parse_known_args([arg for arg in argv if arg not in ("-h", "--help")])
    fields = None
    if first.command == "generate":
        try:
            plugins = _plugin_manager(first)
        except LatentStudioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        fields = _fields(plugins)
    args = build_parser(fields).parse_args(argv)
    if fields is not None:
        args.plugin_manager, args.fields = plugins, fields
    _data_folder(args)
    try:
        if args.command is None:
            return _serve(args)
        if args.command == "plugins":
            return _plugins(args)
        if args.command == "samplers":
            return _samplers()
        if args.command == "models":
            return _models(args)
        if args.command == "upscalers":
            return _upscalers(args)
        if args.command == "upscale":
            return _upscale(args)
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
    serve(args, _maybe_ray(args, _engine(args, allow_paths=False, allow_download=args.allow_download)))
    return 0


def _maybe_ray(args: argparse.Namespace, engine: Any) -> Any:
    """``engine``, or with ``--ray`` the engine whose generations run on Ray Serve replicas."""
    from webui.serve.options import connect, ray_problem

    problem = ray_problem(args)
    if problem:
        raise InvalidRequestError(problem)
    return connect(args, engine) if args.ray else engine


def _plugins(args: argparse.Namespace) -> int:
    from webui.plugin_admin import run_command

    return run_command(args)


def _samplers() -> int:
    from webui.engine.pipeline import Engine

    for name in Engine().schedulers.names():
        print(name)
    return 0


def _engine(
    args: argparse.Namespace, *, allow_paths: bool = True, allow_download: bool = True, plugins: Any = None
) -> Any:
    from webui.engine.devices import pick_device, pick_dtype
    from webui.engine.pipeline import Engine

    _quiet_libraries()
    device = pick_device(args.device)
    dtype = "auto" if args.dtype == "auto" else pick_dtype(args.dtype, device)
    return Engine(
        plugins=plugins,
        models_dir=str(args.models_dir),
        default_model=args.model,
        device=device,
        dtype=dtype,
        extra_models_dirs=args.extra_models_dir,
        memory=memory_settings(args),
        allow_paths=allow_paths,
        allow_pickle=getattr(args, "allow_pickle", False),
        allow_download=allow_download,
        limits=Limits.from_args(args),
    )


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


def _training(module: str, command: str) -> Any:
    """The module ``training.<module>``. The training code sits beside ``webui/`` in a source
    checkout and is not installed with the package (only the model's author runs it); without it,
    or without one of its requirements, ``command`` fails with a one-line error."""
    import importlib

    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "training" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))  # e.g. `latent-studio train` from an editable install
    try:
        return importlib.import_module(f"training.{module}")
    except ModuleNotFoundError as error:
        if error.name in ("training", f"training.{module}"):
            raise LatentStudioError(
                f"`{command}` needs the training code, which is not part of the installed package: run it from a "
                "source checkout of Latent Studio (the training/ folder beside webui/)"
            ) from None
        raise LatentStudioError(
            f"`{command}` needs the package {error.name!r}: pip install -r requirements-train.txt"
        ) from None


def _share(text: str) -> float:
    """A share from 0 to 1, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text[:20]!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text[:20]!r}")
    return value


def _train(args: argparse.Namespace) -> int:
    train_module = _training("train", "train")
    TrainConfig, train = train_module.TrainConfig, train_module.train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = TrainConfig(seed=args.seed)
    names = ("steps", "vae_steps", "scenes", "pair_share", "phrasing_share", "reader_steps")
    for name in (*names, *(name for name, _ in TRAIN_PHASE_LENGTHS)):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.batch_size is not None:
        config.batch = args.batch_size
    if args.init_from is not None and not (args.init_from / "model_index.json").is_file():
        raise InvalidRequestError(f"--init-from {args.init_from}: no model_index.json there")
    out = train(
        args.out, args.checkpoint_dir, config, device=args.device, init_from=args.init_from, hours=args.hours
    )
    if out is not None:
        print(out)
    return 0


def _positive_hours(text: str) -> float:
    """A number of hours above 0, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of hours, got {text[:20]!r}") from None
    if not (0.0 < value < 10_000.0):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a number of hours above 0, got {text[:20]!r}")
    return value


def _evaluate(args: argparse.Namespace) -> int:
    evaluation = _training("evaluate", "evaluate")  # before a model is loaded
    evaluate, format_table = evaluation.evaluate, evaluation.format_table

    tasks = args.tasks or evaluation.TASK_ORDER
    if args.sheet is not None and not {"held_out", "pair_held_out"} & set(tasks):
        raise InvalidRequestError(
            "--sheet draws the held_out and pair_held_out tasks' images: run one of them"
        )
    samples: list[Any] | None = [] if args.sheet is not None else None
    engine = _engine(args)
    engine.schedulers.get(args.sampler)  # an unknown name is refused before any model loads
    scores = evaluate(
        engine,
        args.model,
        seed=args.seed,
        n=args.n,
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        batch_size=args.batch_size,
        tasks=tasks,
        progress=lambda line: print(line, file=sys.stderr),
        samples=samples,
    )
    print(format_table(scores))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(scores, indent=2) + "\n")
    if samples is not None:
        shown = [
            sample
            for task in ("held_out", "pair_held_out")
            for sample in [s for s in samples if s.task == task][: args.sheet_count]
        ]
        try:
            args.sheet.parent.mkdir(parents=True, exist_ok=True)
            evaluation.sample_sheet(shown).save(args.sheet, format="PNG")
        except OSError as error:
            raise InvalidRequestError(f"--sheet {args.sheet}: {error.strerror or error}") from None
    return 0


def _task_list(text: str) -> tuple[str, ...]:
    """Comma-separated evaluation tasks, for argparse (checked against the evaluation's list)."""
    try:
        known = _training("evaluate", "evaluate").TASK_ORDER
    except LatentStudioError as error:  # no training code: argparse reports it in one line
        raise argparse.ArgumentTypeError(str(error)) from None
    tasks = tuple(part.strip() for part in text[:1000].split(",") if part.strip())
    unknown = [task for task in tasks if task not in known]
    if not tasks or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown task {(unknown or [text])[0][:40]!r}; choose from {', '.join(known)}"
        )
    return tasks


def _models(args: argparse.Namespace) -> int:
    for entry in _engine(args).models.list():
        print(json.dumps({"name": entry.name, "kind": entry.kind, "source": entry.source}))
    return 0


def _upscalers(args: argparse.Namespace) -> int:
    for name in _engine(args).upscalers.names():
        print(name)
    return 0


def _upscale(args: argparse.Namespace) -> int:
    """Upscale each input; its path is printed when saved. Unreadable inputs are refused before any work."""
    from webui.metadata import read_png_parameters
    from webui.output import check_writable, save_png
    from webui.postprocess import POSTPROCESSING_KEY, parse_size, save_extras, seed_of, upscale_image

    size = parse_size(args.size) if args.size is not None else None
    if args.crop and size is None:
        raise InvalidRequestError("--crop needs --size")
    images = [(path, _open(path, "image")) for path in args.inputs]
    root = getattr(args, "outputs_dir", None) or paths.outputs_dir()
    problem = check_writable(args.output if args.output is not None else root)
    if problem:
        raise InvalidRequestError(
            f"{'--output' if args.output is not None else 'the outputs folder'} {problem}"
        )
    engine = _engine(args)
    engine.upscalers.get(args.upscaler)  # an unknown name fails before any image is worked on
    for path, image in images:
        try:
            parameters = read_png_parameters(path)
        except (OSError, ValueError):
            parameters = None
        result = upscale_image(
            engine, image, args.upscaler, scale=args.scale, size=size, crop=args.crop, parameters=parameters
        )
        if args.output is None:
            saved = save_extras(result, root)
        else:
            saved = save_png(
                result.image,
                args.output,
                seed=seed_of(parameters),
                infotext=parameters,
                extra={POSTPROCESSING_KEY: result.note} if result.info else None,
            )
        print(saved, flush=True)
    return 0


def _plugin_manager(args: argparse.Namespace) -> Any:
    """The plugins this command runs with (one manager for the command line and its engine)."""
    from webui.plugins import make_plugin_manager

    return make_plugin_manager()


def _fields(plugins: Any) -> Any:
    from webui.fields import FieldRegistry

    return FieldRegistry.from_plugins(plugins)


def _generate(args: argparse.Namespace) -> int:
    from webui.output import BatchSaver, check_writable, output_dir

    fields = args.fields
    values = field_values(args, fields)
    for name, value in list(values.items()):
        if fields[name].kind == "image":
            values[name] = _open(Path(value), fields[name].label.lower())
    task = args.task or (
        "inpaint"
        if values.get("mask")
        else "seg2img"
        if values.get("seg_map") and not values.get("init_image")
        else "img2img"
        if values.get("init_image")
        else "txt2img"
    )
    values.setdefault("model", args.model)
    values.update(_plot_values(args))
    request = fields.new_request(task, values)
    request = fields.validate(
        request.validate(tasks=fields)
    )  # fail fast on bad input, before a model is loaded
    problem = check_writable(args.out)
    if problem:
        raise InvalidRequestError(f"--out {problem}")
    engine = _maybe_ray(args, _engine(args, plugins=args.plugin_manager))
    from webui.plot import enabled

    if enabled(request):
        return _plot(args, engine, request)
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


def _plot_values(args: argparse.Namespace) -> dict[str, Any]:
    """The plot fields ``--x/--y/--z TYPE=VALUES`` set (none when no axis is given)."""
    given = {axis: getattr(args, f"plot_{axis}", None) for axis in ("x", "y", "z")}
    if all(value is None for value in given.values()):
        return {}
    values: dict[str, Any] = {
        "xyz_enabled": True,
        "xyz_draw_legend": not args.no_legend,
        "xyz_keep_seeds": bool(args.keep_random_seeds),
    }
    for axis, text in given.items():
        if text is None:
            continue
        kind, equals, listed = str(text).partition("=")
        if not equals or not kind.strip():
            raise InvalidRequestError(
                f'--{axis} {str(text)[:100]!r}: write TYPE=VALUES, e.g. --{axis} "steps=4,8"'
            )
        values[f"xyz_{axis}_type"], values[f"xyz_{axis}_values"] = kind.strip(), listed
    return values


def _plot(args: argparse.Namespace, engine: Any, request: Any) -> int:
    """Run an X/Y/Z plot: each image saved (and its path printed) as it is made, then the grids
    into ``<out>/<task>-grids``."""
    from webui.output import BatchSaver, output_dir
    from webui.plot import PlotResult, execute, grid_folder, make_plan, source_names

    plan = make_plan(request, engine.fields, limits=engine.limits, names=source_names(engine))
    print(f"X/Y/Z plot: {len(plan.cells)} cells, {plan.images} images", file=sys.stderr, flush=True)
    saver = BatchSaver(output_dir(args.out, request.task), report=lambda path: print(path, flush=True))
    try:
        for event in execute(
            engine, plan, on_batch=saver, grid_dir=grid_folder(args.out, request.task), preview_every=0
        ):
            if isinstance(event, PlotResult):
                for grid in event.grids:
                    if grid.path is not None:
                        print(grid.path, flush=True)
                    else:
                        print(f"error: the grid could not be saved: {grid.error}", file=sys.stderr)
                        return 2
    except LatentStudioError as error:
        note = saver.summary()
        if note is None:
            raise
        raise LatentStudioError(f"{error} ({note})") from error
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
