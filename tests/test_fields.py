"""The field and task registry: declarations checked once, values checked and completed, infotext
written and read back from the same declaration."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from webui.api import (
    BUILTIN_FIELDS,
    Field,
    FieldRegistry,
    GenerationRequest,
    InvalidRequestError,
    format_infotext,
    hookimpl,
    make_plugin_manager,
    parse_infotext,
)


def registry_with(*plugins) -> tuple[FieldRegistry, object]:
    pm = make_plugin_manager(entry_points=False, plugin_dirs=[], extra=plugins)
    return FieldRegistry.from_plugins(pm), pm


def test_every_request_attribute_is_a_declared_field_with_the_same_default():
    declared = {field.name: field for field in BUILTIN_FIELDS}
    for attribute in dataclasses.fields(GenerationRequest):
        if attribute.name in ("task", "extra"):
            continue
        assert attribute.name in declared, f"{attribute.name} has no field declaration"
        assert declared[attribute.name].default == attribute.default, attribute.name
    registry, _ = registry_with()
    assert [field.name for field in registry][: len(BUILTIN_FIELDS)] == [
        field.name for field in BUILTIN_FIELDS
    ]
    assert list(registry.tasks) == ["txt2img", "img2img", "inpaint", "seg2img"]
    # the built-in features declared as plugins (CFG rescale, hires fix, outpainting, styles, X/Y/Z plot)
    builtin_plugin_fields = {field.name: field.plugin for field in registry.plugin_fields()}
    assert {"cfg_rescale", "enable_hr", "outpaint_left", "styles", "xyz_enabled"} <= set(
        builtin_plugin_fields
    )
    assert all(plugin.startswith("webui.builtin.") for plugin in builtin_plugin_fields.values())


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        (dict(name="Bad Name", kind="int"), "use 1-40 lowercase letters"),
        (dict(name="x" * 41, kind="int"), "use 1-40 lowercase letters"),
        (dict(name="level", kind="decimal"), "kind must be one of int, float"),
        (dict(name="level", kind="choice"), "a choice field needs choices"),
        (dict(name="level", kind="choice", choices="files:/etc"), "is neither a list nor one of samplers"),
        (
            dict(name="level", kind="int", default=5, maximum=3),
            "its default is not valid (level must be between",
        ),
        (dict(name="level", kind="int", tasks=("nope",)), "unknown task 'nope'"),
        (dict(name="level", kind="int", widget="knob"), "widget must be one of"),
        (dict(name="steps", kind="int"), "field 'steps' is already registered by webui.builtin.fields"),
    ],
)
def test_bad_declarations_fail_the_plugin_naming_the_problem(declaration, message):
    class Bad:
        @hookimpl
        def register_fields(self, register):
            register(declaration.pop("name"), declaration.pop("kind"), **declaration)

    class Good:
        @hookimpl
        def register_fields(self, register):
            register("sharpen", "float", default=0.0, minimum=0.0, maximum=2.0)

    registry, pm = registry_with(Bad(), Good())
    bad = [record for record in pm.records.values() if record.error]
    assert len(bad) == 1 and message in bad[0].error and "register_fields" in bad[0].error
    assert "sharpen" in registry  # the next plugin still registers


def test_tasks_require_all_or_any_of_their_inputs():
    class Trace:
        @hookimpl
        def register_tasks(self, register):
            register(
                "trace", "Trace", requires=("paper",), requires_any=("lines", "photo"), message="give lines"
            )

        @hookimpl
        def register_fields(self, register):
            for name in ("paper", "lines", "photo"):
                register(name, "image", tasks=("trace",))

    registry, _ = registry_with(Trace())
    image = Image.new("RGB", (8, 8))
    with pytest.raises(InvalidRequestError, match="^give lines$"):
        registry.validate(GenerationRequest(task="trace", extra={"lines": image}))  # no paper
    with pytest.raises(InvalidRequestError, match="^give lines$"):
        registry.validate(GenerationRequest(task="trace", extra={"paper": image}))  # neither lines nor photo
    for one in ("lines", "photo"):
        done = registry.validate(GenerationRequest(task="trace", extra={"paper": image, one: image}))
        assert done.extra[one] is not None


def test_a_plugin_cannot_take_a_builtin_task_name():
    class Clash:
        @hookimpl
        def register_tasks(self, register):
            register("txt2img", "Mine")

    registry, pm = registry_with(Clash())
    assert registry.tasks["txt2img"].plugin == "webui.builtin.fields"
    assert any(
        "task 'txt2img' is already registered" in (record.error or "") for record in pm.records.values()
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (Field("n", "int", default=1, minimum=0, maximum=9), 10, "n must be between 0 and 9, got 10"),
        (Field("n", "int", default=1), True, "n must be a whole number, got True"),
        (Field("n", "int", default=1), 2.5, "n must be a whole number, got 2.5"),
        (Field("x", "float", default=0.0), float("nan"), "x must be a number, got nan"),
        (
            Field("x", "float", default=0.0, minimum=0, maximum=1),
            float("inf"),
            "x must be between 0 and 1, got inf",
        ),
        (Field("on", "bool", default=False), "yes", "on must be true or false"),
        (Field("t", "text", default=""), "\ud800", "lone surrogate"),
        (Field("t", "text", default=""), "a" * 10_001, "t has 10001 characters; the limit is 10000"),
        (Field("c", "choice", default="a", choices=("a", "b")), "c", "unknown c 'c'; choose one of a, b"),
        (Field("c", "choice", default="a", choices=("a", "b")), None, "c needs a value"),
        (Field("img", "image"), "/etc/passwd", "img must be an image, not a file name"),
    ],
)
def test_check_refuses_bad_values_with_one_line(field, value, message):
    with pytest.raises(InvalidRequestError) as caught:
        field.check(value)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_parse_reads_text_and_refuses_huge_numbers_without_converting_them():
    assert Field("n", "int", default=1).parse(" 20.0 ") == 20
    assert Field("x", "float", default=0.0).parse("0.25") == 0.25
    assert Field("on", "bool", default=False).parse("Yes") is True
    assert Field("on", "bool", default=False).parse("off") is False
    assert (
        Field("v", "choice", choices="models:vae", none_label="Automatic", nullable=True).parse("Automatic")
        is None
    )
    with pytest.raises(InvalidRequestError, match="n must be a whole number"):
        Field("n", "int", default=1).parse("9" * 1_000_000)  # not int()-ed: bounded work
    with pytest.raises(InvalidRequestError, match="n must be a whole number, got '2.5'"):
        Field("n", "int", default=1).parse("2.5")


def test_plugin_values_are_checked_and_completed_with_defaults():
    class Sharpen:
        @hookimpl
        def register_fields(self, register):
            register(
                "sharpen",
                "float",
                default=0.0,
                minimum=0.0,
                maximum=2.0,
                tasks=("img2img",),
                task_defaults={"img2img": 0.5},
            )
            register("mode", "choice", default="soft", choices=("soft", "hard"))

    registry, _ = registry_with(Sharpen())
    done = registry.validate(GenerationRequest(prompt="x", extra={"mode": "hard", "free": [1, 2]}))
    builtin = {
        field.name: field.default for field in registry.plugin_fields() if field.plugin.startswith("webui.")
    }
    assert done.extra == {**builtin, "sharpen": 0.0, "mode": "hard", "free": [1, 2]}
    init = Image.new("RGB", (8, 8))
    img2img = registry.validate(registry.new_request("img2img", {"init_image": init, "prompt": "x"}))
    assert img2img.extra["sharpen"] == 0.5 and img2img.strength == 0.75
    assert registry.new_request("inpaint", {}).strength == 1.0  # the built-in per-task default
    with pytest.raises(InvalidRequestError, match="unknown mode 'medium'; choose one of soft, hard"):
        registry.validate(GenerationRequest(extra={"mode": "medium"}))
    with pytest.raises(InvalidRequestError, match="sharpen must be a number"):
        registry.validate(GenerationRequest(extra={"sharpen": "2"}))


def test_infotext_is_written_and_read_back_from_the_declaration():
    class Tone:
        @hookimpl
        def register_fields(self, register):
            register("tone", "choice", default="warm", choices=("warm", "cold"), infotext="Tone")
            register("grain", "int", default=0, minimum=0, maximum=10, infotext="Grain", record="always")
            register("secret", "text", default="", infotext="Secret", send=False)

    registry, _ = registry_with(Tone())
    request = registry.validate(GenerationRequest(prompt="a", extra={"tone": "cold", "secret": "x"}))
    parameters: dict = {"Steps": 20}
    registry.record(parameters, request)
    assert parameters == {"Steps": 20, "Tone": "cold", "Grain": 0, "Secret": "x"}
    text = format_infotext(
        "a cat",
        "",
        {
            **parameters,
            "VAE": "kl-f8.safetensors",
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "Clip skip": "two",
        },
    )
    values, notes = registry.from_infotext(parse_infotext(text))
    assert values["tone"] == "cold" and values["grain"] == 0 and values["steps"] == 20
    assert values["vae"] == "kl-f8" and values["sampler"] == "DPM++ 2M Karras" and values["prompt"] == "a cat"
    assert "secret" not in values
    assert notes == ["Clip skip 'two' is not a number; not sent"]
    only, _ = registry.from_infotext(parse_infotext(text), task="txt2img", names=["tone", "steps"])
    assert only == {"tone": "cold", "steps": 20}
