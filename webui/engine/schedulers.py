"""The scheduler (sampler) registry: A1111's sampler names mapped to diffusers schedulers.

Plugins add samplers through the ``register_schedulers(register)`` hook. A scheduler instance is
built fresh for every request from the model's own scheduler configuration, so no sampler state
is shared between requests.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from webui.errors import PluginError, UnknownSamplerError

SchedulerFactory = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its display name, how to build it, and who registered it."""

    name: str
    factory: Any  # a diffusers SchedulerMixin subclass, or a callable(config) -> scheduler
    overrides: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    plugin: str | None = None

    def build(self, base_config: dict[str, Any], *, seed: int | None = None) -> Any:
        """Build a new scheduler from the model's scheduler config plus this sampler's overrides."""
        config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        # Clipping the predicted clean sample to [-1, 1] is for pixel-space models (DDIM's and DDPM's
        # class default); latents range wider, and every latent model's own config turns it off. A
        # config that does not say (an Euler model's, say) must not get it from the sampler's class.
        if "clip_sample" not in config and _accepts(self.factory, "clip_sample"):
            config["clip_sample"] = False
        if inspect.isclass(self.factory):
            scheduler = cast(Any, self.factory).from_config(config, **self.overrides)
        else:
            scheduler = self.factory({**config, **self.overrides})
        # Stochastic samplers that keep their own noise source (DPM++ SDE's Brownian tree) are
        # seeded from the request, so that the seed reproduces the image.
        if seed is not None and "noise_sampler_seed" in getattr(scheduler, "config", {}):
            scheduler.register_to_config(noise_sampler_seed=seed)
            scheduler.noise_sampler_seed = seed
        return scheduler


@functools.cache
def _accepts(factory: Any, option: str) -> bool:
    """Whether a scheduler class takes ``option`` (a callable factory gets the config as it is)."""
    if not inspect.isclass(factory):
        return False
    try:
        return option in inspect.signature(factory.__init__).parameters
    except (TypeError, ValueError):
        return False


class SchedulerRegistry:
    """Name → :class:`SamplerSpec`. Names are matched case-insensitively, aliases too."""

    def __init__(self) -> None:
        self._specs: dict[str, SamplerSpec] = {}
        self._lookup: dict[str, str] = {}

    def register(
        self,
        name: str,
        factory: Any,
        *,
        aliases: Iterable[str] = (),
        plugin: str | None = None,
        **overrides: Any,
    ) -> None:
        """Register a sampler. ``factory`` is a scheduler class (built with ``from_config``) or a
        callable taking the merged config dict. Re-registering a name replaces it (a plugin may
        override a built-in); an alias that collides with another sampler's name is refused."""
        if not isinstance(name, str) or not name.strip():
            raise PluginError(f"sampler name must be a non-empty string, got {name!r}")
        if not (inspect.isclass(factory) and hasattr(factory, "from_config")) and not callable(factory):
            raise PluginError(f"sampler {name!r}: factory must be a scheduler class or a callable")
        aliases = tuple(aliases)
        for alias in aliases:
            owner = self._lookup.get(alias.lower())
            if owner is not None and owner != name:
                raise PluginError(f"sampler alias {alias!r} of {name!r} is already used by {owner!r}")
        self._specs[name] = SamplerSpec(name, factory, dict(overrides), aliases, plugin)
        self._lookup[name.lower()] = name
        for alias in aliases:
            self._lookup[alias.lower()] = name

    def names(self) -> list[str]:
        return list(self._specs)

    def get(self, name: str) -> SamplerSpec:
        key = self._lookup.get(str(name).lower())
        if key is None:
            raise UnknownSamplerError(
                f"unknown sampler {str(name)[:60]!r}; available: {', '.join(self._specs)}"
            )
        return self._specs[key]

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in self._lookup

    def build(self, name: str, base_config: dict[str, Any], *, seed: int | None = None) -> Any:
        return self.get(name).build(base_config, seed=seed)
