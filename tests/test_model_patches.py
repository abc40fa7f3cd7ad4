"""Model patches (the ``patch_model`` hook): applied in order under the model's lock for one request,
undone in reverse order afterwards, also on an error and an interrupt, leaving the cached model bit
for bit as it was."""

from __future__ import annotations

import threading

import pytest
import torch
from components import engine_with

from webui.api import (
    GenerationControl,
    GenerationRequest,
    InvalidRequestError,
    ModelPatches,
    hookimpl,
    make_plugin_manager,
)
from webui.engine.lora import bundle_lock
from webui.engine.models import model_lock

BASE = dict(prompt="a blue square", steps=3, seed=4, width=64, height=64, sampler="Euler", cfg_scale=5.0)


def weights(bundle) -> dict[str, torch.Tensor]:
    modules = {"unet": bundle.unet, **{f"te{k}": m for k, m in enumerate(bundle.text_encoders)}}
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }


def assert_same(before: dict[str, torch.Tensor], bundle) -> None:
    after = weights(bundle)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was not restored bit for bit"


def pixels(result) -> torch.Tensor:
    return torch.stack([item.pixels for item in result.images])


class Shift:
    """Adds ``amount`` to the UNet's first convolution bias and logs apply/undo under ``label``."""

    def __init__(self, label: str, amount: float, log: list[str], fail: bool = False) -> None:
        self.label, self.amount, self.log, self.fail = label, amount, log, fail

    @hookimpl
    def patch_model(self, request, context, patches: ModelPatches) -> None:
        bias = context.bundle.unet.conv_in.bias
        saved = bias.detach().clone()

        def apply() -> None:
            self.log.append(f"apply {self.label}")
            if self.fail:
                raise InvalidRequestError(f"patch {self.label} does not fit")
            with torch.no_grad():
                bias.add_(self.amount)

        def undo() -> None:
            self.log.append(f"undo {self.label}")
            with torch.no_grad():
                bias.copy_(saved)

        patches.add(self.label, apply, undo)


def test_patches_change_the_image_apply_in_order_and_undo_in_reverse(bundle) -> None:
    before = weights(bundle)
    base = pixels(engine_with().generate(GenerationRequest(**BASE), bundle=bundle))
    log: list[str] = []
    seen: list[float] = []

    class Probe:
        @hookimpl
        def on_step(self, step) -> None:
            seen.append(float(step.context.bundle.unet.conv_in.bias[0]))

    # pluggy calls the last registered plugin first: "b" is collected, so applied, before "a"
    result = engine_with(Shift("a", 0.25, log), Shift("b", 0.5, log), Probe()).generate(
        GenerationRequest(**BASE), bundle=bundle
    )
    assert log == ["apply b", "apply a", "undo a", "undo b"]
    assert seen and all(abs(v - (float(before["unet.conv_in.bias"][0]) + 0.75)) < 1e-6 for v in seen)
    assert float((pixels(result) - base).abs().max()) > 1e-3
    assert_same(before, bundle)
    assert torch.equal(pixels(engine_with().generate(GenerationRequest(**BASE), bundle=bundle)), base)


def test_a_patch_that_fails_to_apply_undoes_the_earlier_ones(bundle) -> None:
    before = weights(bundle)
    log: list[str] = []
    engine = engine_with(Shift("broken", 0.1, log, fail=True), Shift("good", 0.5, log))
    with pytest.raises(InvalidRequestError, match="patch broken does not fit"):
        engine.generate(GenerationRequest(**BASE), bundle=bundle)
    assert log == ["apply good", "apply broken", "undo good"]
    assert_same(before, bundle)


def test_patches_are_undone_when_a_later_hook_raises(bundle) -> None:
    before = weights(bundle)
    log: list[str] = []

    class Broken:
        @hookimpl
        def provide_conditioning(self, request, context, conditioning) -> None:
            assert log == ["apply shift"], "the patch is in place while the batch runs"
            raise RuntimeError("conditioning failed")

    with pytest.raises(RuntimeError, match="conditioning failed"):
        engine_with(Shift("shift", 0.5, log), Broken()).generate(GenerationRequest(**BASE), bundle=bundle)
    assert log == ["apply shift", "undo shift"]
    assert_same(before, bundle)


def test_patches_are_undone_after_an_interrupt(bundle) -> None:
    before = weights(bundle)
    log: list[str] = []
    control = GenerationControl()
    request = GenerationRequest(**{**BASE, "batch_count": 3})
    result = engine_with(Shift("shift", 0.5, log)).generate(
        request, bundle=bundle, control=control, callback=lambda step: control.interrupt()
    )
    assert result.interrupted and len(result.images) == 1  # the first batch, stopped after one step
    assert log == ["apply shift", "undo shift"]
    assert_same(before, bundle)


def test_the_model_lock_lives_with_the_model_cache_and_is_held_while_patched(bundle) -> None:
    assert bundle_lock is model_lock  # the old name still works
    held: list[bool] = []

    def try_lock() -> threading.Thread:
        lock = engine.models.lock(bundle)
        acquired = threading.Event()

        def other() -> None:  # another request would wait here
            with lock:
                acquired.set()

        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        held.append(not acquired.wait(0.2))
        return thread

    threads: list[threading.Thread] = []

    class Probe:
        @hookimpl
        def patch_model(self, request, context, patches) -> None:
            patches.add("probe", lambda: threads.append(try_lock()))

    engine = engine_with(Probe())
    engine.generate(GenerationRequest(**BASE), bundle=bundle)
    assert held == [True], "another thread got the model's lock while a request's patches were applied"
    threads[0].join(10)
    assert not threads[0].is_alive()


def test_lora_and_embeddings_are_builtin_patch_plugins() -> None:
    pm = make_plugin_manager(entry_points=False, plugin_dirs=[])
    names = {pm.get_name(impl.plugin) for impl in pm.hook.patch_model.get_hookimpls()}
    assert {"webui.builtin.lora", "webui.builtin.embeddings"} <= names
