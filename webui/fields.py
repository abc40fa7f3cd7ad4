"""Request fields and tasks: each declared once, everything else derived from the declaration.

A :class:`Field` says what one input of a generation is: its name, kind, default, valid range or
choices, label and help, the tasks that use it, its infotext key and how to read it back. From that
one declaration the host derives

* the value in the :class:`~webui.request.GenerationRequest` (built-in fields are its attributes;
  a plugin's fields live in ``request.extra``, checked and filled with their defaults by
  :meth:`FieldRegistry.validate`, so a plugin always finds a value of the declared type there);
* the web UI control on each tab of a task that uses it (``webui.ui.controls``);
* the command-line option of ``launch.py generate`` (``--cfg-rescale 0.7``, or ``--set
  cfg_rescale=0.7`` for any field);
* the infotext entry written with each image (``record``) and PNG Info's reading of it back
  (:meth:`FieldRegistry.from_infotext`) and "Send to".

Plugins declare fields with the ``register_fields(register)`` hook and tasks with
``register_tasks(register)``; the built-in fields and tasks (:data:`BUILTIN_FIELDS`,
:data:`BUILTIN_TASKS`) are registered through the same hooks by ``webui.builtin.fields``.

This module imports neither torch nor gradio.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from webui.errors import InvalidRequestError

__all__ = [
    "BUILTIN_FIELDS",
    "BUILTIN_TASKS",
    "Field",
    "FieldRegistry",
    "KINDS",
    "TaskSpec",
    "check_float",
    "check_int",
    "check_text",
]

Kind = Literal["int", "float", "bool", "text", "choice", "image"]
KINDS: tuple[str, ...] = ("int", "float", "bool", "text", "choice", "image")
Record = Literal["changed", "always", "hook"]
RECORDS: tuple[str, ...] = ("changed", "always", "hook")
WIDGETS: tuple[str, ...] = (
    "slider",
    "number",
    "dropdown",
    "radio",
    "checkbox",
    "textbox",
    "upload",
    "sketch",
)
# where a choice field's choices come from when they are not a fixed list
CHOICE_SOURCES: tuple[str, ...] = (
    "samplers",
    "models:checkpoint",
    "models:vae",
    "models:controlnet",
    "models:lora",
    "models:embedding",
    "styles",  # the prompt styles (styles.csv, see webui.styles)
    "upscalers",  # the image upscalers (Lanczos, Nearest, upscaler model files)
    "upscalers:hires",  # the latent upscalers, then the image upscalers
)
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")
MAX_TEXT = 10_000  # characters of a plugin's text field, unless it declares max_chars
MAX_ITEMS = 100  # entries of a field with multiple=True
MAX_NUMBER_TEXT = 100  # characters of a number written as text (int() of more is slow, and no value needs it)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Field:
    """One input of a generation, declared once.

    ``kind``: ``"int"``, ``"float"``, ``"bool"``, ``"text"``, ``"choice"`` or ``"image"`` (a PIL image
    in the request; a file path on the command line; an upload or a drawing canvas in the web UI).

    Values: ``default`` (``task_defaults`` per task, e.g. a denoising strength of 1 for inpainting);
    numbers lie in [``minimum``, ``maximum``]; ``ui_minimum``/``ui_maximum``/``step`` are the
    slider's ends and step when they differ from the valid range (``limit`` names the
    :class:`~webui.limits.Limits` attribute that lowers the slider's top, e.g. ``"max_steps"``);
    ``choices`` is a fixed list or a source (:data:`CHOICE_SOURCES`: ``"samplers"``,
    ``"models:vae"``...); ``none_label`` is the choice shown for ``None`` ("Automatic");
    ``nullable`` lets ``None`` through (the model's own value). Text holds at most ``max_chars``.
    ``multiple=True`` makes a choice field a list of choices (a tuple in the request; a
    multi-select in the web UI, a repeatable flag, a JSON array in the infotext).

    Where it shows: ``tasks`` (``None``: every task); ``ui=False`` keeps it off the web UI (a tab
    may still build its own control for it); ``group`` is the row it sits in (``"advanced"``: the
    "More options" accordion, the default for plugin fields); ``widget`` picks a control other
    than the kind's usual one; ``cli=False`` gives no generated flag (``--set`` still works).

    Infotext: ``infotext`` is its key (``"CFG rescale"``); ``record`` says who writes it:
    ``"changed"`` (the host, when the value is not the default), ``"always"`` (the host, always) or
    ``"hook"`` (a ``write_metadata``/``provide_conditioning`` hook writes it, e.g. the seed of each
    image). ``read(parsed)`` reads the value from a whole parsed infotext when one key is not
    enough (A1111's "Sampler" plus "Schedule type"); ``send=False`` keeps PNG Info from sending it.
    """

    name: str
    kind: Kind
    default: Any = None
    label: str = ""
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    ui_minimum: float | None = None
    ui_maximum: float | None = None
    limit: str | None = None
    choices: tuple[str, ...] | str | None = None
    none_label: str | None = None
    nullable: bool = False
    max_chars: int | None = None
    tasks: tuple[str, ...] | None = None
    task_defaults: Mapping[str, Any] = field(default_factory=dict)
    ui: bool = True
    group: str = "advanced"
    widget: str | None = None
    lines: int = 1
    cli: bool = True
    infotext: str | None = None
    record: Record = "changed"
    read: Callable[[Mapping[str, Any]], Any] | None = None
    send: bool = True
    multiple: bool = False  # a choice field holding a list of choices
    plugin: str | None = None  # who registered it (set by the registry)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.name.replace("_", " ").capitalize())
        object.__setattr__(self, "task_defaults", MappingProxyType(dict(self.task_defaults)))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.choices, (list, tuple)):
            object.__setattr__(self, "choices", tuple(str(choice) for choice in self.choices))

    # -- what it is -------------------------------------------------------------------------

    @property
    def flag(self) -> str:
        """The generated command-line flag: ``--cfg-rescale`` for ``cfg_rescale``."""
        return "--" + self.name.replace("_", "-")

    @property
    def fixed_choices(self) -> tuple[str, ...] | None:
        """The choices when they are a fixed list (not a source such as ``"samplers"``)."""
        return self.choices if isinstance(self.choices, tuple) else None

    @property
    def source(self) -> str | None:
        """Where the choices come from when they are not a fixed list, e.g. ``"models:vae"``."""
        return self.choices if isinstance(self.choices, str) else None

    def applies_to(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    def default_for(self, task: str | None = None) -> Any:
        if task is not None and task in self.task_defaults:
            return self.task_defaults[task]
        return self.default

    def describe(self) -> str:
        """One line for ``--help`` and error messages: the help text, the range or the choices."""
        parts = [self.help] if self.help else []
        if self.kind in ("int", "float") and (self.minimum is not None or self.maximum is not None):
            parts.append(
                f"{_shown(self.minimum) if self.minimum is not None else '-inf'}.."
                f"{_shown(self.maximum) if self.maximum is not None else 'inf'}"
            )
        if self.fixed_choices:
            parts.append(("any of: " if self.multiple else "one of: ") + ", ".join(self.fixed_choices))
        if self.multiple:
            parts.append("repeatable")
        elif self.default is not None and self.kind != "image":
            parts.append(f"default {_shown(self.default)}")
        return "; ".join(parts)

    # -- values -----------------------------------------------------------------------------

    def check(self, value: Any) -> Any:
        """``value`` checked against this field (and normalised: a whole float becomes an int for an
        int field, the ``none_label`` becomes ``None``); raises :class:`InvalidRequestError` with a
        one-line message naming the field."""
        if self.multiple:
            return self._check_many(value)
        if value is None or (self.none_label is not None and value == self.none_label):
            if self.nullable or self.default is None:
                return None
            raise InvalidRequestError(f"{self.name} needs a value")
        if self.kind == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            return check_int(self.name, value, self.minimum, self.maximum)
        if self.kind == "float":
            return float(check_float(self.name, value, self.minimum, self.maximum))
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidRequestError(f"{self.name} must be true or false, got {_shown(value)}")
            return value
        if self.kind in ("text", "choice"):
            if not isinstance(value, str):
                raise InvalidRequestError(f"{self.name} must be text, got {_shown(value)}")
            if self.kind == "text":
                limit = self.max_chars if self.max_chars is not None else MAX_TEXT
                if limit and len(value) > limit:
                    raise InvalidRequestError(
                        f"{self.name} has {len(value)} characters; the limit is {limit}"
                    )
                check_text(self.name, value)
                return value
            check_text(self.name, value)
            choices = self.fixed_choices
            if choices is not None and value not in choices:
                raise InvalidRequestError(
                    f"unknown {self.name} {_shown(value)}; choose one of {', '.join(choices)}"
                )
            return value
        if self.kind == "image":
            if isinstance(value, (str, bytes, os.PathLike)):  # never a file on the server by name
                raise InvalidRequestError(
                    f"{self.name} must be an image, not a file name: open the file first"
                )
            from webui.images import normalize_image  # PIL and numpy: only when an image is given

            return normalize_image(value, self.name)
        raise InvalidRequestError(f"{self.name}: unknown kind {self.kind!r}")  # pragma: no cover

    def parse(self, text: Any) -> Any:
        """A value of this field from text (a ``--set`` value, an infotext entry); raises
        :class:`InvalidRequestError` naming the field when the text is not one."""
        if self.multiple:
            return self._parse_many(text)
        text = str(text).strip()
        if self.none_label is not None and text == self.none_label:
            return self.check(None)
        if self.kind in ("int", "float"):
            number = parse_number(text, self.kind)
            if number is None:
                raise InvalidRequestError(
                    f"{self.name} must be a {'whole ' if self.kind == 'int' else ''}number, "
                    f"got {_shown(text)}"
                )
            return self.check(number)
        if self.kind == "bool":
            word = text.lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise InvalidRequestError(
                f"{self.name} must be true or false (yes/no, on/off, 1/0), got {_shown(text)}"
            )
        if self.kind == "image":
            return text  # a path: the caller opens it (webui.cli)
        return self.check(text)

    def format(self, value: Any) -> Any:
        """The value as the infotext writes it (a list of choices: a JSON array)."""
        if self.multiple:
            return json.dumps([str(item) for item in value or ()], ensure_ascii=False)
        return value

    def _check_many(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise InvalidRequestError(f"{self.name} must be a list of names, got {_shown(value)}")
        if len(items) > MAX_ITEMS:
            raise InvalidRequestError(f"{self.name} has {len(items)} entries; the limit is {MAX_ITEMS}")
        one = replace(self, multiple=False, default=None, nullable=False, none_label=None)
        return tuple(one.check(item) for item in items)

    def _parse_many(self, text: Any) -> tuple[str, ...]:
        """A list of choices from a JSON array (``["a", "b"]``, as the infotext writes it), a list
        (a repeated flag), or one name."""
        if isinstance(text, (list, tuple)):
            return self._check_many([str(item).strip() for item in text])
        text = str(text).strip()
        if not text:
            return ()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                raise InvalidRequestError(
                    f"{self.name} is not a JSON list of names: {_shown(text)}"
                ) from None
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise InvalidRequestError(f"{self.name} must be a list of names, got {_shown(text)}")
            return self._check_many(items)
        return self._check_many([text])


@dataclass(frozen=True)
class TaskSpec:
    """A task: a name (also the outputs sub-folder and the web API's endpoint prefix), a label, the
    fields a request of it must carry (``requires``: every one; ``requires_any``: at least one of
    them, e.g. a sketch or a photo to trace) and the message when they are missing."""

    name: str
    label: str = ""
    requires: tuple[str, ...] = ()
    message: str = ""
    help: str = ""
    requires_any: tuple[str, ...] = ()
    plugin: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.name)
        object.__setattr__(self, "requires", tuple(self.requires))
        object.__setattr__(self, "requires_any", tuple(self.requires_any))

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every field named by ``requires`` and ``requires_any``."""
        return self.requires + tuple(name for name in self.requires_any if name not in self.requires)

    def check(self, values: Mapping[str, Any]) -> None:
        missing = [name for name in self.requires if values.get(name) is None]
        if missing:
            raise InvalidRequestError(self.message or f"{self.name} needs {' and '.join(missing)}")
        if self.requires_any and all(values.get(name) is None for name in self.requires_any):
            raise InvalidRequestError(self.message or f"{self.name} needs {' or '.join(self.requires_any)}")


# -- the registry ---------------------------------------------------------------------------


class FieldRegistry:
    """Every registered field (in registration order: built-ins first) and task.

    Built with :meth:`from_plugins`, which calls the ``register_tasks`` and ``register_fields`` hooks
    of every plugin, built-ins first. A name is registered once: a second field or task of the same
    name, an invalid name or declaration raises ``ValueError`` naming the first owner (the plugin's
    start-up hook fails and is reported; the rest of the app goes on).
    """

    def __init__(self) -> None:
        self._fields: dict[str, Field] = {}
        self._tasks: dict[str, TaskSpec] = {}

    @classmethod
    def from_plugins(cls, plugins: Any) -> FieldRegistry:
        registry = cls()
        _call_each(plugins, "register_tasks", registry.add_task)
        _call_each(plugins, "register_fields", registry.add)
        return registry

    @classmethod
    def builtin(cls) -> FieldRegistry:
        """The built-in fields and tasks alone (for checks that run without plugins)."""
        registry = cls()
        for spec in BUILTIN_TASKS:
            registry.add_task(spec)
        for declared in BUILTIN_FIELDS:
            registry.add(declared)
        return registry

    # -- registering ------------------------------------------------------------------------

    def add(
        self, declared: Field | str, kind: str | None = None, *, plugin: str | None = None, **options: Any
    ) -> Field:
        """Register a field: a :class:`Field`, or its name, kind and options
        (``register("cfg_rescale", "float", default=0.0, minimum=0, maximum=1)``)."""
        if isinstance(declared, str):
            if kind is None:
                raise ValueError(f"field {declared!r}: give its kind ({', '.join(KINDS)})")
            declared = Field(declared, kind, **options)  # type: ignore[arg-type]
        elif not isinstance(declared, Field) or kind is not None or options:
            raise ValueError("register a Field, or a name, a kind and options")
        declared = _owned(declared, plugin)
        _check_declaration(declared, self._tasks)
        return _add_once(self._fields, declared, "field")

    def add_task(
        self, declared: TaskSpec | str, label: str = "", *, plugin: str | None = None, **options: Any
    ) -> TaskSpec:
        """Register a task: a :class:`TaskSpec`, or its name, label and options
        (``register("sketch2img", "Sketch to image", requires=("sketch",))``)."""
        if isinstance(declared, str):
            declared = TaskSpec(declared, label, **options)
        elif not isinstance(declared, TaskSpec) or label or options:
            raise ValueError("register a TaskSpec, or a name, a label and options")
        declared = _owned(declared, plugin)
        if not isinstance(declared.name, str) or not NAME.match(declared.name):
            raise ValueError(
                f"task name {declared.name!r}: use 1-40 lowercase letters, digits and '_', "
                "starting with a letter"
            )
        return _add_once(self._tasks, declared, "task")

    # -- reading ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Field]:
        return iter(self._fields.values())

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def __len__(self) -> int:
        return len(self._fields)

    def __getitem__(self, name: str) -> Field:
        return self._fields[name]

    def get(self, name: str) -> Field | None:
        return self._fields.get(name)

    def field(self, name: str) -> Field:
        """The field called ``name``; an unknown name raises :class:`InvalidRequestError` with the
        closest known names."""
        found = self._fields.get(name)
        if found is None:
            close = difflib.get_close_matches(str(name)[:100], list(self._fields), n=3)
            hint = (
                f"; did you mean {' or '.join(close)}?"
                if close
                else f"; known fields: {', '.join(self._fields)}"
            )
            raise InvalidRequestError(f"unknown field {str(name)[:100]!r}{hint}")
        return found

    @property
    def tasks(self) -> Mapping[str, TaskSpec]:
        return MappingProxyType(self._tasks)

    def task(self, name: Any) -> TaskSpec:
        spec = self._tasks.get(name) if isinstance(name, str) else None
        if spec is None:
            raise InvalidRequestError(f"unknown task {_shown(name)}; choose one of {', '.join(self._tasks)}")
        return spec

    def for_task(self, task: str) -> list[Field]:
        """The fields a request of ``task`` uses, in registration order."""
        return [declared for declared in self._fields.values() if declared.applies_to(task)]

    def plugin_fields(self) -> list[Field]:
        """Fields that are not attributes of :class:`~webui.request.GenerationRequest` (they live in
        ``request.extra``)."""
        from webui.request import request_attributes

        attributes = request_attributes()
        return [declared for declared in self._fields.values() if declared.name not in attributes]

    # -- requests ---------------------------------------------------------------------------

    def validate(self, request: Any) -> Any:
        """``request`` with every plugin field in ``request.extra`` checked (a bad value raises
        :class:`InvalidRequestError` naming it) and missing ones filled with their default for the
        request's task; the task itself must be registered and carry its required fields. Values in
        ``extra`` that no field declares are left as they are (free-form plugin data)."""
        spec = self.task(request.task)
        extra = dict(request.extra)
        for declared in self.plugin_fields():
            if declared.name in extra:
                extra[declared.name] = declared.check(extra[declared.name])
            else:
                extra[declared.name] = declared.default_for(request.task)
        values = {name: getattr(request, name, None) for name in spec.inputs}
        values.update({name: extra[name] for name in spec.inputs if name in extra})
        spec.check(values)
        return request.replace(extra=extra)

    def values(self, request: Any) -> dict[str, Any]:
        """Every field's value in ``request`` (attributes and ``extra``), by field name."""
        found: dict[str, Any] = {}
        for declared in self._fields.values():
            if hasattr(request, declared.name):
                found[declared.name] = getattr(request, declared.name)
            else:
                found[declared.name] = request.extra.get(declared.name, declared.default_for(request.task))
        return found

    def split(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``values`` by field name, split into request attributes and ``extra`` entries."""
        from webui.request import request_attributes

        attributes = request_attributes()
        own = {name: value for name, value in values.items() if name in attributes}
        extra = {name: value for name, value in values.items() if name not in attributes}
        return own, extra

    def new_request(self, task: str, values: Mapping[str, Any]) -> Any:
        """A :class:`~webui.request.GenerationRequest` of ``task`` from field values by name (from a
        form, a command line, an API call): built-in fields become attributes, the rest ``extra``;
        fields not given get their default for the task (a denoising strength of 1 for inpainting).
        Nothing is checked here: ``request.validate(tasks=registry)`` and :meth:`validate` do."""
        from webui.request import GenerationRequest

        given = dict(values)
        for declared in self._fields.values():
            if declared.name not in given and declared.task_defaults and declared.applies_to(task):
                given[declared.name] = declared.default_for(task)
        own, extra = self.split(given)
        return GenerationRequest(task=task, extra=extra, **own)

    # -- infotext ---------------------------------------------------------------------------

    def record(self, parameters: dict[str, Any], request: Any) -> None:
        """Add the infotext entries the host writes (fields with ``record`` "changed" or "always"
        that apply to the request's task) to ``parameters``; entries already there are kept."""
        for declared in self._fields.values():
            if (
                declared.infotext is None
                or declared.record == "hook"
                or not declared.applies_to(request.task)
            ):
                continue
            if declared.infotext in parameters or declared.kind == "image":
                continue
            value = (
                getattr(request, declared.name)
                if hasattr(request, declared.name)
                else request.extra.get(declared.name)
            )
            if value is None:
                continue
            if declared.record == "changed" and value == declared.default_for(request.task):
                continue
            parameters[declared.infotext] = declared.format(value)

    def from_infotext(
        self,
        parsed: Mapping[str, Any],
        *,
        task: str | None = None,
        names: Iterable[str] | None = None,
        bounded: bool = True,
    ) -> tuple[dict[str, Any], list[str]]:
        """The field values a parsed infotext sets (``webui.metadata.parse_infotext``'s dict), and one
        note per entry that could not be read (``"Steps x is not a number; not sent"``).

        Only fields with an infotext key (or a ``read`` function) and ``send=True`` are read, only
        those applying to ``task`` when given, only ``names`` when given. Choices from a source are
        not checked here (the caller knows what is installed). ``bounded=False`` reads a number
        outside its field's range as it is written (PNG Info brings it into its control's range and
        says so)."""
        wanted = set(names) if names is not None else None
        values: dict[str, Any] = {}
        notes: list[str] = []
        for declared in self._fields.values():
            if not declared.send or (declared.infotext is None and declared.read is None):
                continue
            if (wanted is not None and declared.name not in wanted) or (
                task and not declared.applies_to(task)
            ):
                continue
            if declared.read is not None:
                try:
                    value = declared.read(parsed)
                except InvalidRequestError as error:
                    notes.append(f"{error}; not sent")
                    continue
                if value is not None:
                    values[declared.name] = value
                continue
            if declared.infotext not in parsed:
                continue
            raw = parsed[declared.infotext]
            try:
                reader = (
                    declared
                    if bounded or declared.kind not in ("int", "float")
                    else replace(declared, minimum=None, maximum=None)
                )
                values[declared.name] = reader.parse(raw)
            except InvalidRequestError:
                kind = "a number" if declared.kind in ("int", "float") else "valid"
                notes.append(f"{declared.infotext} {_shown(raw)} is not {kind}; not sent")
        return values, notes


def _owned(declared: Any, plugin: str | None) -> Any:
    """``declared`` (a Field or TaskSpec) marked as registered by ``plugin``."""
    return replace(declared, plugin=plugin) if plugin is not None and declared.plugin is None else declared


def _add_once(table: dict[str, Any], declared: Any, what: str) -> Any:
    """Put ``declared`` into ``table`` under its name; a name already there is refused, naming its owner."""
    first = table.get(declared.name)
    if first is not None:
        raise ValueError(
            f"{what} {declared.name!r} is already registered"
            + (f" by {first.plugin}" if first.plugin else "")
        )
    table[declared.name] = declared
    return declared


def _call_each(plugins: Any, hook: str, add: Callable[..., Any]) -> None:
    """Call ``hook`` of each plugin in registration order (built-ins first), with a ``register``
    that remembers which plugin registered what. A plugin's failure is handled by the start-up
    guard of its hook (recorded, logged, shown), and the next plugin goes on."""
    caller = getattr(plugins.hook, hook)
    records = getattr(plugins, "records", {})

    def builtin_first(impl: Any) -> int:
        record = records.get(impl.plugin_name)
        return 0 if record is not None and record.source == "builtin" else 1

    # pluggy lists implementations by registration order within tryfirst/trylast bands
    for impl in sorted(caller.get_hookimpls(), key=builtin_first):
        if getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False):
            continue
        name = impl.plugin_name

        def register(declared: Any, *args: Any, _name: str | None = name, **options: Any) -> Any:
            return add(declared, *args, plugin=_name, **options)

        impl.function(register=register)


def _check_declaration(declared: Field, tasks: Mapping[str, TaskSpec]) -> None:
    where = f"field {declared.name!r}"
    if not isinstance(declared.name, str) or not NAME.match(declared.name):
        raise ValueError(f"{where}: use 1-40 lowercase letters, digits and '_', starting with a letter")
    if declared.kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {declared.kind!r}")
    if declared.record not in RECORDS:
        raise ValueError(f"{where}: record must be one of {', '.join(RECORDS)}")
    if declared.widget is not None and declared.widget not in WIDGETS:
        raise ValueError(f"{where}: widget must be one of {', '.join(WIDGETS)}")
    if declared.kind == "choice" and declared.choices is None:
        raise ValueError(
            f"{where}: a choice field needs choices (a list or one of {', '.join(CHOICE_SOURCES)})"
        )
    if declared.multiple and declared.kind != "choice":
        raise ValueError(f"{where}: only a choice field may take multiple values")
    if declared.source is not None and declared.source not in CHOICE_SOURCES:
        raise ValueError(
            f"{where}: choices {declared.source!r} is neither a list nor one of {', '.join(CHOICE_SOURCES)}"
        )
    if declared.fixed_choices is not None and not declared.fixed_choices:
        raise ValueError(f"{where}: the list of choices is empty")
    if declared.tasks is not None:
        unknown = [task for task in declared.tasks if task not in tasks]
        if unknown:
            raise ValueError(f"{where}: unknown task {unknown[0]!r} (register tasks in register_tasks)")
    for task, value in declared.task_defaults.items():
        if task not in tasks:
            raise ValueError(f"{where}: task_defaults names unknown task {task!r}")
        _check_default(declared, value)
    if declared.kind != "image":
        _check_default(declared, declared.default)


def _check_default(declared: Field, value: Any) -> None:
    try:
        if value is not None:
            declared.check(value)
    except InvalidRequestError as error:
        raise ValueError(f"field {declared.name!r}: its default is not valid ({error})") from None


# -- checks shared with GenerationRequest.validate ----------------------------------------------


def check_text(name: str, text: str) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (from bytes that were not UTF-8 on a
    command line, or a JSON ``\\ud800`` escape) can be neither tokenized nor saved."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(
            f"the {name} is not valid text: character {error.start + 1} is a lone surrogate "
            f"({text[error.start]!a}); was it written in another encoding than UTF-8?"
        ) from None


def check_int(name: str, value: Any, low: float | None, high: float | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a whole number, got {_shown(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequestError(
            f"{name} must be between {_shown(low)} and {_shown(high)}, got {_shown(value)}"
        )
    return value


def check_float(name: str, value: Any, low: float | None, high: float | None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise InvalidRequestError(f"{name} must be a number, got {_shown(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequestError(
            f"{name} must be between {low:g} and {high:g}, got {value:g}"
            if low is not None and high is not None and math.isfinite(value)
            else f"{name} must be between {_shown(low)} and {_shown(high)}, got {_shown(value)}"
        )
    return value


def parse_number(text: Any, kind: str) -> int | float | None:
    """``text`` as an int (exactly, also "20.0") or a finite float; None when it is neither."""
    text = str(text).strip()
    if len(text) > MAX_NUMBER_TEXT:
        return None
    try:
        if kind == "int":
            try:
                return int(text)
            except ValueError:
                value = float(text)
                return int(value) if math.isfinite(value) and value.is_integer() else None
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _shown(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None:
        return "None"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- the built-in fields and tasks ------------------------------------------------------------

IMAGE_TASKS = ("img2img", "inpaint", "seg2img")
DEFAULT_SAMPLER = "DPM++ 2M Karras"
MASKED_CONTENT: tuple[str, ...] = ("original", "fill", "latent noise", "latent nothing")


def _strip_weight_suffix(name: str) -> str:
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_vae(parsed: Mapping[str, Any]) -> str | None:
    """A1111 writes the VAE's file name; pickers list names without the extension."""
    vae = parsed.get("VAE")
    return _strip_weight_suffix(str(vae).strip()) if vae else None


def _read_sampler(parsed: Mapping[str, Any]) -> str | None:
    """A1111 since 1.9 writes the schedule apart (``Sampler: DPM++ 2M, Schedule type: Karras``):
    joined back into our sampler name (kept as it is for "Automatic" and "Uniform")."""
    sampler = str(parsed.get("Sampler") or "").strip()
    if not sampler:
        return None
    schedule = str(parsed.get("Schedule type", "")).strip()
    if schedule and schedule.lower() not in ("automatic", "uniform"):
        return f"{sampler} {schedule}"
    return sampler


def _read_text(key: str) -> Callable[[Mapping[str, Any]], str | None]:
    def read(parsed: Mapping[str, Any]) -> str | None:
        return str(parsed[key]) if key in parsed else None

    return read


BUILTIN_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("txt2img", "Text to image"),
    TaskSpec("img2img", "Image to image", requires=("init_image",), message="img2img needs an init image"),
    TaskSpec(
        "inpaint",
        "Inpainting",
        requires=("init_image", "mask"),
        message="inpainting needs an image and a mask",
    ),
    TaskSpec(
        "seg2img", "Segmentation to image", requires=("seg_map",), message="seg2img needs a segmentation map"
    ),
)

# In the order the web UI shows them. Infotext keys are AUTOMATIC1111's.
BUILTIN_FIELDS: tuple[Field, ...] = (
    Field(
        "model",
        "choice",
        choices="models:checkpoint",
        nullable=True,
        label="Model",
        group="model",
        cli=False,
        help="model folder, name under --models-dir, or Hugging Face id",
        infotext="Model",
        record="hook",
    ),
    Field(
        "vae",
        "choice",
        choices="models:vae",
        none_label="Automatic",
        nullable=True,
        label="VAE",
        group="model",
        help="a separate VAE by name (default: the model's own)",
        infotext="VAE",
        record="hook",
        read=_read_vae,
    ),
    Field(
        "prompt",
        "text",
        default="",
        label="Prompt",
        group="prompt",
        lines=2,
        limit="max_prompt_chars",
        max_chars=0,
        infotext="Prompt",
        record="hook",
        read=_read_text("Prompt"),
    ),
    Field(
        "negative_prompt",
        "text",
        default="",
        label="Negative prompt",
        group="prompt",
        limit="max_prompt_chars",
        max_chars=0,
        infotext="Negative prompt",
        record="hook",
        read=_read_text("Negative prompt"),
    ),
    Field(
        "sampler",
        "choice",
        default=DEFAULT_SAMPLER,
        choices="samplers",
        label="Sampler",
        group="sampling",
        help="see `launch.py samplers`",
        infotext="Sampler",
        record="hook",
        read=_read_sampler,
    ),
    Field(
        "steps",
        "int",
        default=20,
        minimum=1,
        maximum=1000,
        ui_maximum=150,
        step=1,
        limit="max_steps",
        label="Steps",
        group="sampling",
        infotext="Steps",
        record="hook",
    ),
    Field(
        "cfg_scale",
        "float",
        minimum=0.0,
        maximum=100.0,
        ui_minimum=1.0,
        ui_maximum=30.0,
        step=0.5,
        nullable=True,
        label="CFG scale",
        group="sampling",
        help="default: the model's (7 unless it says)",
        infotext="CFG scale",
        record="hook",
    ),
    Field(
        "width",
        "int",
        minimum=8,
        maximum=8192,
        ui_minimum=64,
        ui_maximum=2048,
        step=8,
        limit="max_pixels",
        nullable=True,
        label="Width",
        group="size",
        help="multiple of 8; default: the model's native size",
        infotext="Size-1",
        record="hook",
    ),
    Field(
        "height",
        "int",
        minimum=8,
        maximum=8192,
        ui_minimum=64,
        ui_maximum=2048,
        step=8,
        limit="max_pixels",
        nullable=True,
        label="Height",
        group="size",
        help="multiple of 8; default: the model's native size",
        infotext="Size-2",
        record="hook",
    ),
    Field(
        "batch_count",
        "int",
        default=1,
        minimum=1,
        maximum=10_000,
        ui_maximum=100,
        step=1,
        limit="max_batch",
        label="Batch count",
        group="size",
        help="batches, one after the other",
    ),
    Field(
        "batch_size",
        "int",
        default=1,
        minimum=1,
        maximum=64,
        ui_maximum=8,
        step=1,
        limit="max_batch",
        label="Batch size",
        group="size",
        help="images per batch",
        infotext="Batch size",
        record="hook",
    ),
    Field(
        "seed",
        "int",
        default=-1,
        minimum=-1,
        maximum=2**32 - 1,
        widget="number",
        label="Seed (-1 = random)",
        group="seed",
        help="-1 = random; image k of a batch uses seed + k",
        infotext="Seed",
        record="hook",
    ),
    Field(
        "clip_skip",
        "int",
        default=1,
        minimum=1,
        maximum=12,
        step=1,
        label="Clip skip",
        help="skip the text encoder's last layers",
        infotext="Clip skip",
        record="hook",
    ),
    Field(
        "eta",
        "float",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        label="Eta",
        help="noise of ancestral and DDIM samplers",
        infotext="Eta",
        record="hook",
    ),
    Field(
        "init_image",
        "image",
        tasks=IMAGE_TASKS,
        label="Init image",
        group="init",
        help="img2img / inpaint: the image to start from",
    ),
    Field(
        "strength",
        "float",
        default=0.75,
        task_defaults={"inpaint": 1.0},
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        tasks=IMAGE_TASKS,
        label="Denoising strength",
        group="init",
        help="denoising strength (default 0.75; 1.0 for inpainting)",
        infotext="Denoising strength",
        record="hook",
    ),
    Field(
        "mask",
        "image",
        tasks=("inpaint",),
        label="Mask",
        group="mask",
        help="inpaint: white = repaint; resized to the image if needed",
    ),
    Field(
        "mask_blur",
        "int",
        default=4,
        minimum=0,
        maximum=256,
        ui_maximum=64,
        step=1,
        tasks=("inpaint",),
        label="Mask blur",
        group="mask",
        infotext="Mask blur",
        record="hook",
    ),
    Field(
        "masked_content",
        "choice",
        default="original",
        choices=MASKED_CONTENT,
        widget="radio",
        tasks=("inpaint",),
        label="Masked content",
        group="masked",
    ),
    Field("invert_mask", "bool", default=False, tasks=("inpaint",), label="Invert mask", group="masked"),
    Field(
        "keep_unmasked",
        "bool",
        default=True,
        tasks=("inpaint",),
        label="Keep the unmasked area",
        group="masked",
        help="paste the result over the original through the blurred mask, so only the masked area changes",
    ),
    Field(
        "only_masked",
        "bool",
        default=False,
        tasks=("inpaint",),
        label="Only masked (inpaint at full resolution)",
        group="only_masked",
        help="inpaint the masked region at full resolution",
    ),
    Field(
        "only_masked_padding",
        "int",
        default=32,
        minimum=0,
        maximum=4096,
        ui_maximum=256,
        step=4,
        tasks=("inpaint",),
        label="Only masked padding",
        group="only_masked",
    ),
    Field(
        "seg_map",
        "image",
        tasks=("seg2img",),
        label="Segmentation map",
        group="seg_map",
        help="seg2img: a colour-coded segmentation map",
    ),
    Field(
        "controlnet",
        "choice",
        choices="models:controlnet",
        none_label="The model's own",
        nullable=True,
        tasks=("seg2img",),
        label="ControlNet",
        group="control",
        help="ControlNet folder or name for the segmentation map",
    ),
    Field(
        "control_scale",
        "float",
        default=1.0,
        minimum=0.0,
        maximum=10.0,
        ui_maximum=2.0,
        step=0.05,
        tasks=("seg2img",),
        label="ControlNet weight",
        group="control",
        infotext="ControlNet weight",
        record="hook",
    ),
    Field(
        "control_start",
        "float",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        tasks=("seg2img",),
        label="Start",
        group="control",
        help="ControlNet from this fraction of the steps",
    ),
    Field(
        "control_end",
        "float",
        default=1.0,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        tasks=("seg2img",),
        label="End",
        group="control",
        help="ControlNet until this fraction of the steps",
    ),
)


def builtin_field(name: str) -> Field:
    """A built-in field's declaration (for the request's own checks)."""
    return _BUILTIN_BY_NAME[name]


_BUILTIN_BY_NAME: dict[str, Field] = {declared.name: declared for declared in BUILTIN_FIELDS}
