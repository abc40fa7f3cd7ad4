"""A model's prompt reader: a small network over the prompt's text-encoder states that says which
scene the prompt asks for, head by head (``count``, ``background``, ``position``, ``axis`` and
each object slot's ``color``, ``shape`` and ``size``). The default model ships one in
``reader/`` (trained by ``training/reader.py``); ``webui/builtin/layout.py`` uses it.

``reader/config.json`` holds the network's size, its heads' labels and the scores it was trained
to; ``reader/model.safetensors`` its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WINDOW = 32  # tokens read: the first chunk of a prompt (the default model's text window)
# what a reader's config.json may ask for (a model folder is not trusted to size memory)
MAX_CONFIG_CHARS = 100_000
MAX_HEADS, MAX_LABELS, MAX_LABEL_CHARS = 32, 64, 40
MAX_SIZE = {"features": 4096, "width": 1024, "layers": 8, "attention_heads": 16}


class PromptReader(nn.Module):
    """Token states (B, T, features) → one logit vector per head: a projection, a small transformer
    encoder, then one learned query per head pooling the tokens by attention."""

    def __init__(
        self,
        heads: dict[str, tuple[str, ...]] | dict[str, list[str]],
        *,
        features: int = 768,
        width: int = 128,
        layers: int = 2,
        attention_heads: int = 4,
    ) -> None:
        super().__init__()
        self.labels = {name: tuple(labels) for name, labels in heads.items()}
        self.size = {
            "features": features,
            "width": width,
            "layers": layers,
            "attention_heads": attention_heads,
        }
        self.project = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(
            width, attention_heads, 2 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(len(heads), width) * 0.02)
        self.pool = nn.MultiheadAttention(width, attention_heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.outputs = nn.ModuleList(nn.Linear(width, len(labels)) for labels in self.labels.values())

    def forward(self, states: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.encoder(self.project(states))
        queries = self.queries.unsqueeze(0).expand(len(states), -1, -1)
        pooled = self.norm(self.pool(queries, tokens, tokens, need_weights=False)[0])
        return [out(pooled[:, k]) for k, out in enumerate(self.outputs)]


@dataclass(frozen=True)
class Reading:
    """What a prompt asks for: each head's label with its probability."""

    labels: dict[str, str]
    confidence: dict[str, float]

    def __getitem__(self, head: str) -> str:
        return self.labels[head]

    @property
    def objects(self) -> int:
        return 2 if self.labels.get("count") == "two" else 1

    def heads_used(self) -> tuple[str, ...]:
        """The heads this reading's scene needs (one object: its position; two: the axis and slot b)."""
        slot_a = ("a_color", "a_shape", "a_size")
        if self.objects == 1:
            return ("count", "background", "position", *slot_a)
        return ("count", "background", "axis", *slot_a, "b_color", "b_shape", "b_size")

    @property
    def least_confidence(self) -> float:
        return min(self.confidence[head] for head in self.heads_used())


def read_prompt_states(reader: PromptReader, states: torch.Tensor) -> Reading:
    """The reading of one prompt's token states (1, T, features); only the first chunk is read."""
    tokens = states[:1, :WINDOW].float()
    with torch.no_grad():
        logits = reader(tokens.to(next(reader.parameters()).device))
    labels, confidence = {}, {}
    for (head, names), out in zip(reader.labels.items(), logits, strict=True):
        probs = out[0].softmax(-1)
        best = int(probs.argmax())
        labels[head], confidence[head] = names[best], float(probs[best])
    return Reading(labels, confidence)


def save_reader(reader: PromptReader, folder: Path, scores: dict[str, Any] | None = None) -> Path:
    """Write ``reader`` to ``folder`` (config.json with its size, labels and ``scores``; safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"size": reader.size, "heads": {k: list(v) for k, v in reader.labels.items()}}
    if scores is not None:
        config["scores"] = scores
    (folder / CONFIG).write_text(json.dumps(config, indent=2, default=float) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in reader.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    return folder


def load_reader(folder: Path) -> PromptReader:
    """The reader saved in ``folder`` (fp16 on disk, fp32 in memory), in eval mode."""
    from safetensors.torch import load_file

    text = (folder / CONFIG).read_text()[: MAX_CONFIG_CHARS + 1]
    if len(text) > MAX_CONFIG_CHARS:
        raise ValueError(f"{folder / CONFIG} is over {MAX_CONFIG_CHARS} characters")
    config = json.loads(text)
    heads = config["heads"]
    if (
        not isinstance(heads, dict)
        or not 0 < len(heads) <= MAX_HEADS
        or not all(
            isinstance(labels, list)
            and 0 < len(labels) <= MAX_LABELS
            and all(isinstance(label, str) and 0 < len(label) <= MAX_LABEL_CHARS for label in labels)
            for labels in heads.values()
        )
    ):
        raise ValueError(f"{folder / CONFIG}: 'heads' must map each head to its labels (short words)")
    size = {k: int(v) for k, v in config.get("size", {}).items()}
    for name, value in size.items():
        if name not in MAX_SIZE or not 0 < value <= MAX_SIZE[name]:
            raise ValueError(f"{folder / CONFIG}: size {name}={value} is outside 1..{MAX_SIZE.get(name, 0)}")
    reader = PromptReader(heads, **size)
    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
    reader.load_state_dict(state)
    return reader.eval().requires_grad_(False)
