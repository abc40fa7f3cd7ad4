"""Following a generation step by step: progress, ETA, previews, early close, errors."""

from __future__ import annotations

import numpy as np
import pytest
from components import bundle_from, sd_components

from webui.api import Engine, GenerationRequest, make_plugin_manager
from webui.engine import torch_thread
from webui.engine.context import GenerationControl
from webui.engine.stream import Progress, stream
from webui.errors import InvalidRequestError

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run


@pytest.fixture
def engine(tmp_path):
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))
    engine.models.add("tiny", bundle_from(sd_components(tmp_path)))
    return engine


REQUEST = GenerationRequest(
    model="tiny", prompt="a red square", steps=6, seed=3, width=64, height=64, sampler="Euler", batch_count=2
)


def test_progress_counts_every_step_then_gives_the_same_images(engine):
    events = list(stream(engine, REQUEST, preview_every=2))
    progress, result = events[:-1], events[-1]
    assert all(isinstance(e, Progress) for e in progress)
    assert [(e.batch, e.step) for e in progress] == [(b, s) for b in (1, 2) for s in range(1, 7)]
    assert [e.done for e in progress] == list(range(1, 13)) and {e.overall for e in progress} == {12}
    assert progress[-1].eta == 0 and progress[-1].fraction == 1.0
    assert all(e.eta is not None and e.eta >= 0 for e in progress)
    assert "Step 6/6, batch 2/2" in progress[-1].describe()
    previews = [e for e in progress if e.preview]
    assert [(e.batch, e.step) for e in previews] == [(1, 2), (1, 4), (2, 2), (2, 4)]
    assert previews[0].preview[0].size == (64, 64)
    direct = engine.generate(REQUEST)
    assert [np.asarray(i.image).tolist() for i in result.images] == [
        np.asarray(i.image).tolist() for i in direct.images
    ]


def test_closing_the_stream_interrupts_the_generation(engine):
    control = GenerationControl()
    events = stream(engine, REQUEST.replace(steps=50, batch_count=4), control=control, preview_every=0)
    first = next(events)
    assert first.step == 1
    events.close()  # the consumer went away (a closed browser tab)
    assert control.interrupted


def test_errors_come_out_of_the_stream(engine):
    with pytest.raises(InvalidRequestError, match="strength"):
        list(
            stream(
                engine,
                REQUEST.replace(task="img2img", init_image=np.zeros((64, 64, 3), np.uint8), strength=0.0),
            )
        )
    assert len(list(stream(engine, REQUEST.replace(batch_count=1)))) == 7  # and the engine still works


def test_on_batch_gets_each_batch_on_the_torch_thread(engine):
    import threading

    seen: list[tuple[list[int], int]] = []

    def on_batch(images: list) -> None:
        seen.append(([item.seed for item in images], threading.get_ident()))

    result = list(stream(engine, REQUEST, preview_every=0, on_batch=on_batch))[-1]
    assert [seeds for seeds, _ in seen] == [[3], [4]] and result.seeds == [3, 4]
    # one long-lived thread, the same for every generation (one OpenMP team: webui.engine.torch_thread)
    again: list[tuple[list[int], int]] = []
    list(
        stream(
            engine,
            REQUEST,
            preview_every=0,
            on_batch=lambda images: again.append(([], threading.get_ident())),
        )
    )
    threads = {ident for _, ident in seen + again}
    assert len(threads) == 1 and threading.get_ident() not in threads
    (torch_ident,) = threads
    assert torch_thread.call(threading.get_ident) == torch_ident


def test_a_stream_started_on_the_torch_thread_does_not_wait_for_itself(engine):
    def nested() -> list:
        return list(stream(engine, REQUEST.replace(batch_count=1), preview_every=0))

    events = torch_thread.call(nested)  # e.g. a plugin that generates from inside a generation
    assert events[-1].seeds == [3]
