"""The HTTP API as a FastAPI application, and how it is served: beside the web app on its port
(:func:`mount_api`, for ``--api``) or alone (:func:`serve_api_alone`, for ``--nowebui``).

Route groups (docs/http-api.md has curl examples for each):

* ``/sdapi/v1/...``: AUTOMATIC1111's API (:mod:`webui.http.a1111` reads and writes its shapes);
* ``/controlnet/model_list``, ``/controlnet/module_list``: the ControlNet extension's lists;
* ``/api/v1/jobs...``: jobs with ids, states, server-sent events and images by number;
* ``/v1/images/generations``: OpenAI's images API;
* ``/docs`` and ``/openapi.json``: the API's description, behind the same login.

Every generation goes through the one :class:`~webui.http.jobs.JobManager`, whose worker shares the
device's turn and the bound on waiting generations with the web app: a synchronous ``txt2img`` is a
job the call waits for. Every error is ``{"detail": "<one line>"}``: 422 for a bad value, 404 for an
unknown model, sampler or job, 401 without a valid login, 503 (with ``Retry-After``) when busy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from webui.errors import InvalidRequestError, LatentStudioError, ModelNotFoundError, NoModelError
from webui.http import a1111
from webui.http.a1111 import ApiProblem
from webui.http.auth import ApiAccess, ApiSettings
from webui.http.jobs import FINAL_STATES, Job, JobManager, QueueFull

__all__ = ["API_PREFIXES", "ApiDispatch", "build_api", "mount_api", "serve_api_alone"]

log = logging.getLogger(__name__)

API_PREFIXES = ("/sdapi/", "/api/v1/", "/v1/", "/controlnet/", "/docs", "/openapi.json")
JOB_TASKS = {"txt2img": "txt2img", "img2img": "img2img", "inpaint": "img2img", "seg2img": "txt2img"}
SSE_KEEPALIVE = 10.0  # seconds between comments on a quiet event stream
OPENAI_ALIASES = frozenset({"dall-e-2", "dall-e-3", "gpt-image-1"})  # names OpenAI clients send by default
MAX_OPENAI_N = 10


class ApiState:
    """What the routes share: the service (engine, outputs), the jobs, the logins, each caller's
    options (A1111's settings, kept per user: one user's model choice is not another's)."""

    def __init__(
        self, service: Any, jobs: JobManager, access: ApiAccess, args: argparse.Namespace | None
    ) -> None:
        self.service = service
        self.engine = service.engine
        self.jobs = jobs
        self.access = access
        self.args = args
        self.options: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        from webui.ui.security import LoginThrottle

        self.throttle = LoginThrottle() if not access.open else None

    def options_of(self, owner: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.options.get(owner, {}))


def _state(request: Request) -> ApiState:
    return request.app.state.api


def caller(request: Request) -> str:
    """The dependency every route takes: the caller's owner name, or 401/429."""
    state = _state(request)
    header = request.headers.get("authorization")
    owner = state.access.owner(header)
    if owner is not None and (state.throttle is None or not header):
        return owner
    address = request.client.host if request.client else "unknown"
    if not header:
        raise ApiProblem(401, "this API needs a login (HTTP Basic) or an API key (Authorization: Bearer KEY)")
    assert state.throttle is not None
    wait = state.throttle.begin(address)
    if wait > 0:
        raise ApiProblem(429, state.throttle.message(wait))
    if owner is None:
        log.warning("failed API login for user %r from %s", state.access.user_of(header), address)
        raise ApiProblem(401, "wrong user name, password or API key")
    state.throttle.succeeded(address)
    return owner


Owner = Depends(caller)


# -- the application -------------------------------------------------------------------------


def build_api(
    service: Any,
    settings: ApiSettings,
    *,
    max_waiting: int,
    others_waiting: Callable[[], int] = lambda: 0,
    args: argparse.Namespace | None = None,
    busy_message: str | None = None,
) -> FastAPI:
    """The API over ``service`` (a :class:`~webui.ui.service.StudioService`). Its job manager is
    ``app.state.api.jobs`` (close it with the app: :func:`close_api`)."""

    def run(job: Job) -> Any:
        return service.run(job.request, f"api-job:{job.id}", save=bool(job.options.get("save")), turn=False)

    from webui.ui.app import BUSY_MESSAGE

    jobs = JobManager(
        run,
        stop=lambda job: service.interrupt(f"api-job:{job.id}"),
        skip=lambda job: service.skip(f"api-job:{job.id}"),
        max_waiting=max_waiting,
        others_waiting=others_waiting,
        turn=service.device_turn,
        busy_message=busy_message or BUSY_MESSAGE,
        keep_seconds=float(getattr(args, "job_keep_seconds", 3600.0)),
        keep_count=int(getattr(args, "job_keep_count", 100)),
        workers=service.concurrency,  # with Ray Serve, one per replica: jobs run side by side
    )
    app = FastAPI(
        title="Latent Studio API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description="AUTOMATIC1111-compatible routes, jobs that can be followed, OpenAI images.",
    )
    app.state.api = ApiState(service, jobs, ApiAccess(settings), args)
    _errors(app)
    _docs_routes(app)
    _sdapi_routes(app)
    _job_routes(app)
    _openai_routes(app)
    return app


def close_api(app: FastAPI) -> None:
    app.state.api.jobs.close()


def _detail(
    status: int, detail: str, headers: dict[str, str] | None = None, *, openai: bool = False
) -> JSONResponse:
    detail = " ".join(str(detail).split())[:1000] or "error"
    content: dict[str, Any] = {"detail": detail}
    if openai:  # OpenAI's clients read error.message
        content["error"] = {
            "message": detail,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "code": status,
        }
    return JSONResponse(content, status_code=status, headers=headers)


def _errors(app: FastAPI) -> None:
    def is_openai(request: Request) -> bool:
        return request.url.path.startswith("/v1/")

    @app.exception_handler(ApiProblem)
    async def problem(request: Request, error: ApiProblem) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Basic realm="Latent Studio API"'} if error.status == 401 else None
        return _detail(error.status, error.detail, headers, openai=is_openai(request))

    @app.exception_handler(QueueFull)
    async def busy(request: Request, error: QueueFull) -> JSONResponse:
        return _detail(503, str(error), {"Retry-After": str(error.retry_after)}, openai=is_openai(request))

    @app.exception_handler(LatentStudioError)
    async def refused(request: Request, error: LatentStudioError) -> JSONResponse:
        status = (
            404
            if isinstance(error, (ModelNotFoundError, NoModelError))
            else 422
            if isinstance(error, InvalidRequestError)
            else 500
        )
        return _detail(status, str(error), openai=is_openai(request))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return _detail(422, f"{where}: {message}" if where else message, openai=is_openai(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _detail(error.status_code, str(error.detail), openai=is_openai(request))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        log.error("API request %s failed", request.url.path, exc_info=error)
        return _detail(
            500,
            f"internal error ({type(error).__name__}); the server log has the details",
            openai=is_openai(request),
        )


def _docs_routes(app: FastAPI) -> None:
    @app.get("/openapi.json", include_in_schema=False)
    def openapi(owner: str = Owner) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs(owner: str = Owner) -> HTMLResponse:
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="Latent Studio API")


# -- AUTOMATIC1111 -----------------------------------------------------------------------------

_A1111 = "AUTOMATIC1111"


def _generate(state: ApiState, owner: str, body: Any, route: str) -> dict[str, Any]:
    parsed = a1111.parse_body(body, route, state.engine, _settings(state, owner))
    job = state.jobs.submit(owner, parsed.request.task, parsed.request, {"save": parsed.save})
    state.jobs.wait_finished(job)
    if job.state == "failed":
        raise ApiProblem(_failure_status(job), job.error or "generation failed")
    finished = job.result
    if finished is None:  # interrupted before it started
        return {
            "images": [],
            "parameters": parsed.echo,
            "info": json.dumps({"infotexts": [], "all_seeds": []}),
        }
    return a1111.answer(parsed, finished)


def _settings(state: ApiState, owner: str) -> dict[str, Any]:
    return state.options_of(owner)


def _failure_status(job: Job) -> int:
    kind = job.error_kind or ""
    if kind in ("ModelNotFoundError", "NoModelError", "UnknownSamplerError"):
        return 404
    if kind in ("InvalidRequestError", "LimitExceeded"):
        return 422
    if kind == "QueueFull":  # Ray Serve's queue was full (several web apps on one cluster)
        return 503
    return 500


def _sdapi_routes(app: FastAPI) -> None:
    @app.post("/sdapi/v1/txt2img", tags=[_A1111])
    def txt2img(request: Request, body: dict[str, Any] = Body(...), owner: str = Owner) -> dict[str, Any]:  # noqa: B008
        """Text to image, as AUTOMATIC1111 answers it (waits for the image)."""
        return _generate(_state(request), owner, body, "txt2img")

    @app.post("/sdapi/v1/img2img", tags=[_A1111])
    def img2img(request: Request, body: dict[str, Any] = Body(...), owner: str = Owner) -> dict[str, Any]:  # noqa: B008
        """Image to image; with ``mask``, inpainting."""
        return _generate(_state(request), owner, body, "img2img")

    @app.post("/sdapi/v1/png-info", tags=[_A1111])
    def png_info(request: Request, body: dict[str, Any] = Body(...), owner: str = Owner) -> dict[str, Any]:  # noqa: B008
        """The ``parameters`` text of a PNG, and its entries."""
        from webui.limits import check_total
        from webui.metadata import parse_infotext, read_png_parameters

        image = a1111.decode_image(body.get("image"), "image")
        text = read_png_parameters(image) or ""
        limit = _state(request).engine.limits.max_infotext_chars
        check_total(f"the parameters text has {len(text)} characters", len(text), limit, "max_infotext_chars")
        parsed = parse_infotext(text) if text else {}
        return {"info": text, "items": {"parameters": text} if text else {}, "parameters": parsed}

    @app.get("/sdapi/v1/upscalers", tags=[_A1111])
    def upscalers(request: Request, owner: str = Owner) -> list[dict[str, Any]]:
        """The image upscalers (``None``, Lanczos, Nearest, model files), in A1111's shape."""
        from webui.http import extras

        return extras.upscaler_list(_state(request).engine)

    @app.post("/sdapi/v1/extra-single-image", tags=[_A1111])
    def extra_image(request: Request, body: dict[str, Any] = Body(...), owner: str = Owner) -> dict[str, Any]:  # noqa: B008
        """Upscale one image, as A1111's Extras tab (waits for the device's turn)."""
        from webui.http import extras

        return extras.extra_single_image(body, _state(request).service)

    @app.post("/sdapi/v1/extra-batch-images", tags=[_A1111])
    def extra_batch(request: Request, body: dict[str, Any] = Body(...), owner: str = Owner) -> dict[str, Any]:  # noqa: B008
        """Upscale several images (``imageList``) with the same settings."""
        from webui.http import extras

        return extras.extra_batch_images(body, _state(request).service)

    @app.get("/sdapi/v1/progress", tags=[_A1111])
    def progress(request: Request, skip_current_image: bool = False, owner: str = Owner) -> dict[str, Any]:
        """The caller's current job: A1111's fields, plus ``queue_position`` and ``current_task`` (the job id)."""
        state = _state(request)
        mine = [job for job in state.jobs.jobs(owner) if not job.finished]
        job = mine[0] if mine else None
        if job is None:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "current_image": None,
                "textinfo": None,
                "current_task": None,
                "queue_position": None,
                "state": {
                    "skipped": False,
                    "interrupted": False,
                    "stopping_generation": False,
                    "job": "",
                    "job_count": 0,
                    "job_timestamp": "0",
                    "job_no": 0,
                    "sampling_step": 0,
                    "sampling_steps": 0,
                },
            }
        image = None
        if job.preview is not None and not skip_current_image:
            image = a1111.encode_png(job.preview)
        return {
            "progress": round(job.fraction, 4),
            "eta_relative": round(job.eta or 0.0, 2),
            "current_image": image,
            "textinfo": _textinfo(job, state.jobs.position(job)),
            "current_task": job.id,
            "queue_position": state.jobs.position(job),
            "state": {
                "skipped": False,
                "interrupted": job.interrupted,
                "stopping_generation": False,
                "job": f"Batch {job.batch} out of {job.batches}" if job.batches else "",
                "job_count": job.batches or job.request.batch_count,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                "job_no": max(0, job.batch - 1),
                "sampling_step": job.step,
                "sampling_steps": job.total or job.request.steps,
            },
        }

    @app.post("/sdapi/v1/interrupt", tags=[_A1111])
    def interrupt(request: Request, owner: str = Owner) -> None:
        """Stop the caller's running job after its current step (its finished images are kept)."""
        _state(request).jobs.interrupt(owner)

    @app.post("/sdapi/v1/skip", tags=[_A1111])
    def skip(request: Request, owner: str = Owner) -> None:
        """Drop the current batch of the caller's running job and go on with the next."""
        _state(request).jobs.skip(owner)

    @app.get("/sdapi/v1/options", tags=[_A1111])
    def get_options(request: Request, owner: str = Owner) -> dict[str, Any]:
        """The caller's settings (each user has their own; they apply to that user's requests)."""
        return _options(_state(request), owner)

    @app.post("/sdapi/v1/options", tags=[_A1111])
    def set_options(request: Request, body: dict[str, Any] = Body(...), owner: str = Owner) -> None:  # noqa: B008
        """Change the caller's settings; an unknown key is refused (422), nothing is changed then."""
        _set_options(_state(request), owner, body)

    @app.get("/sdapi/v1/cmd-flags", tags=[_A1111])
    def cmd_flags(request: Request, owner: str = Owner) -> dict[str, Any]:
        """The server's launch flags (logins and keys are never shown)."""
        args = _state(request).args
        flags: dict[str, Any] = {}
        for key, value in sorted(vars(args or argparse.Namespace()).items()):
            if key in ("auth", "api_auth", "api_key") or key.endswith(("_file", "_manager")):
                value = None if value is None else "(set)"
            elif isinstance(value, Path):
                value = str(value)
            elif not isinstance(value, (str, int, float, bool, type(None), list)):
                continue
            flags[key] = value
        return flags

    @app.get("/sdapi/v1/samplers", tags=[_A1111])
    def samplers(request: Request, owner: str = Owner) -> list[dict[str, Any]]:
        registry = _state(request).engine.schedulers
        return [
            {"name": name, "aliases": list(registry.get(name).aliases), "options": {}}
            for name in registry.names()
        ]

    @app.get("/sdapi/v1/schedulers", tags=[_A1111])
    def schedulers(request: Request, owner: str = Owner) -> list[dict[str, Any]]:
        """A1111's schedule types: the suffixes of this server's sampler names, and Automatic."""
        names = _state(request).engine.schedulers.names()
        found = ["Automatic"] + sorted(
            {label for label in _SCHEDULES for name in names if name.lower().endswith(" " + label.lower())}
        )
        return [
            {
                "name": name.lower().replace(" ", "_"),  # A1111's names: karras, sgm_uniform...
                "label": name,
                "aliases": None,
                "default_rho": -1,
                "need_inner_model": False,
            }
            for name in found
        ]

    @app.get("/sdapi/v1/sd-models", tags=[_A1111])
    def sd_models(request: Request, owner: str = Owner) -> list[dict[str, Any]]:
        """Installed checkpoints by name (no server paths)."""
        return [
            {
                "title": name,
                "model_name": name,
                "hash": None,
                "sha256": None,
                "filename": name,
                "config": None,
            }
            for name in _state(request).service.names("checkpoint")
        ]

    @app.get("/sdapi/v1/sd-vae", tags=[_A1111])
    def sd_vae(request: Request, owner: str = Owner) -> list[dict[str, Any]]:
        return [{"model_name": name, "filename": name} for name in _state(request).service.names("vae")]

    @app.get("/sdapi/v1/prompt-styles", tags=[_A1111])
    def prompt_styles(request: Request, owner: str = Owner) -> list[dict[str, Any]]:
        """The prompt styles (styles.csv, read again when it changed); use them with ``styles``."""
        from webui.styles import load_styles

        return [
            {"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}
            for style in load_styles(_state(request).engine).values()
        ]

    @app.get("/sdapi/v1/loras", tags=[_A1111])
    def loras(request: Request, owner: str = Owner) -> list[dict[str, Any]]:
        """Installed LoRAs; use one with ``<lora:NAME:WEIGHT>`` in the prompt."""
        return [
            {"name": name, "alias": name, "path": name, "metadata": {}}
            for name in _state(request).service.names("lora")
        ]

    @app.get("/sdapi/v1/embeddings", tags=[_A1111])
    def embeddings(request: Request, owner: str = Owner) -> dict[str, Any]:
        names = _state(request).service.names("embedding")
        return {
            "loaded": {
                name: {
                    "step": None,
                    "sd_checkpoint": None,
                    "sd_checkpoint_name": None,
                    "shape": None,
                    "vectors": None,
                }
                for name in names
            },
            "skipped": {},
        }

    @app.post("/sdapi/v1/refresh-checkpoints", tags=[_A1111])
    def refresh_checkpoints(request: Request, owner: str = Owner) -> None:
        """The lists are read again on every call; this answers as A1111 does."""
        _state(request).service.names("checkpoint")

    @app.post("/sdapi/v1/refresh-loras", tags=[_A1111])
    def refresh_loras(request: Request, owner: str = Owner) -> None:
        _state(request).service.names("lora")

    @app.post("/sdapi/v1/refresh-vae", tags=[_A1111])
    def refresh_vae(request: Request, owner: str = Owner) -> None:
        _state(request).service.names("vae")

    @app.get("/sdapi/v1/memory", tags=[_A1111])
    def memory(request: Request, owner: str = Owner) -> dict[str, Any]:
        """System memory and, with a GPU, the device's (A1111's shape)."""
        return _memory()

    @app.get("/controlnet/model_list", tags=["ControlNet extension"])
    def controlnet_models(request: Request, owner: str = Owner) -> dict[str, Any]:
        """ControlNets by name, for ``alwayson_scripts.controlnet.args[].model``."""
        return {"model_list": _state(request).service.names("controlnet")}

    @app.get("/controlnet/module_list", tags=["ControlNet extension"])
    def controlnet_modules(request: Request, owner: str = Owner) -> dict[str, Any]:
        """Only ``none``: the image is a ready segmentation map (no preprocessor runs here)."""
        return {"module_list": ["none"]}


_SCHEDULES = frozenset({"Karras", "Exponential", "Polyexponential", "SGM Uniform", "Beta"})


def _textinfo(job: Job, position: int | None) -> str:
    if job.state == "queued":
        return f"Waiting in the queue (position {position})" if position else "Waiting for the device"
    return f"Step {job.step}/{job.total}" + (f", batch {job.batch}/{job.batches}" if job.batches > 1 else "")


def _options(state: ApiState, owner: str) -> dict[str, Any]:
    mine = state.options_of(owner)
    return {
        "sd_model_checkpoint": mine.get("sd_model_checkpoint") or state.service.default_model_name(),
        "sd_vae": mine.get("sd_vae") or "Automatic",
        "CLIP_stop_at_last_layers": mine.get("CLIP_stop_at_last_layers", 1),
        "samples_save": mine.get("samples_save", True),
        "outdir_samples": str(state.service.outputs_dir),
    }


def _set_options(state: ApiState, owner: str, body: dict[str, Any]) -> None:
    from webui.engine.vae import is_automatic
    from webui.fields import builtin_field

    unknown = [key for key in body if key not in a1111.OPTION_KEYS]
    if unknown:
        raise InvalidRequestError(
            f"unknown option {str(unknown[0])[:60]!r}; this server has {', '.join(a1111.OPTION_KEYS)}"
        )
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key == "outdir_samples":
            if value not in (None, str(state.service.outputs_dir)):
                raise InvalidRequestError("outdir_samples is set with --outputs-dir when the server starts")
            continue
        if key == "samples_save":
            if not isinstance(value, bool):
                raise InvalidRequestError(f"samples_save must be true or false, got {str(value)[:40]!r}")
        elif key == "CLIP_stop_at_last_layers":
            value = builtin_field("clip_skip").check(value)
        elif key in ("sd_model_checkpoint", "sd_vae"):
            if not isinstance(value, str):
                raise InvalidRequestError(f"{key} must be a name")
            value = a1111.split_hash(value.strip())
            kind = "checkpoint" if key == "sd_model_checkpoint" else "vae"
            if value and not (kind == "vae" and (is_automatic(value) or value.lower() == "none")):
                try:
                    state.engine.models.source_of(value, kind)
                except ModelNotFoundError:
                    raise ApiProblem(
                        404,
                        f"{'model' if kind == 'checkpoint' else 'VAE'} {value[:80]!r} not found; "
                        f"see /sdapi/v1/{'sd-models' if kind == 'checkpoint' else 'sd-vae'}",
                    ) from None
        changes[key] = value
    with state.lock:
        state.options.setdefault(owner, {}).update(changes)


def _memory() -> dict[str, Any]:
    ram: dict[str, Any] = {}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        available = os.sysconf("SC_AVPHYS_PAGES") * size
        ram = {"free": available, "used": pages * size - available, "total": pages * size}
    except (ValueError, OSError, AttributeError):  # not POSIX
        ram = {"error": "unknown on this system"}
    cuda: dict[str, Any] = {"error": "no CUDA device"}
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            cuda = {
                "system": {"free": free, "used": total - free, "total": total},
                "active": {
                    "current": stats.get("active_bytes.all.current", 0),
                    "peak": stats.get("active_bytes.all.peak", 0),
                },
                "allocated": {
                    "current": stats.get("allocated_bytes.all.current", 0),
                    "peak": stats.get("allocated_bytes.all.peak", 0),
                },
                "reserved": {
                    "current": stats.get("reserved_bytes.all.current", 0),
                    "peak": stats.get("reserved_bytes.all.peak", 0),
                },
                "inactive": {
                    "current": stats.get("inactive_split_bytes.all.current", 0),
                    "peak": stats.get("inactive_split_bytes.all.peak", 0),
                },
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
            }
    except Exception as error:  # a broken driver must not break the answer
        cuda = {"error": f"{type(error).__name__}: {error}"[:200]}
    return {"ram": ram, "cuda": cuda}


# -- jobs ----------------------------------------------------------------------------------------

_JOBS = "Jobs"


def _job_view(state: ApiState, job: Job) -> dict[str, Any]:
    finished = job.result
    count = len(finished.files) if finished is not None else 0
    return {
        "id": job.id,
        "task": job.task,
        "state": job.state,
        "position": state.jobs.position(job),
        "step": job.step,
        "steps": job.total or job.request.steps,
        "batch": job.batch,
        "batches": job.batches or job.request.batch_count,
        "progress": round(job.fraction, 4),
        "eta": None if job.eta is None else round(job.eta, 2),
        "error": job.error,
        "images": [f"/api/v1/jobs/{job.id}/images/{n}" for n in range(count)],
        "seeds": list(finished.seeds) if finished is not None else [],
        "infotexts": list(finished.infotexts) if finished is not None else [],
        "created": job.created,
        "started": job.started,
        "ended": job.ended,
    }


def _own_job(state: ApiState, job_id: str, owner: str) -> Job:
    job = state.jobs.get(job_id, owner)
    if job is None:
        raise ApiProblem(404, f"no job {job_id[:80]!r} (finished jobs are kept for a while, then forgotten)")
    return job


def _job_routes(app: FastAPI) -> None:
    @app.post("/api/v1/jobs", status_code=202, tags=[_JOBS])
    def create_job(request: Request, body: dict[str, Any] = Body(...), owner: str = Owner) -> dict[str, Any]:  # noqa: B008
        """Queue a generation and return its id at once. The body is txt2img's or img2img's, plus
        ``task`` (``txt2img``, ``img2img``, ``inpaint`` or ``seg2img``; default: txt2img, or
        img2img when ``init_images`` is given)."""
        state = _state(request)
        task = body.get("task") or ("img2img" if body.get("init_images") else "txt2img")
        if task not in JOB_TASKS:
            raise InvalidRequestError(
                f"unknown task {str(task)[:40]!r}; choose one of {', '.join(JOB_TASKS)}"
            )
        parsed = a1111.parse_body(body, JOB_TASKS[task], state.engine, _settings(state, owner))
        if parsed.request.task != task and task in ("inpaint", "seg2img"):
            need = "a mask" if task == "inpaint" else "a ControlNet unit (alwayson_scripts.controlnet)"
            raise InvalidRequestError(f"{task} needs {need}")
        job = state.jobs.submit(owner, parsed.request.task, parsed.request, {"save": parsed.save})
        return _job_view(state, job)

    @app.get("/api/v1/jobs", tags=[_JOBS])
    def list_jobs(request: Request, owner: str = Owner) -> list[dict[str, Any]]:
        """The caller's jobs, oldest first."""
        state = _state(request)
        return [_job_view(state, job) for job in state.jobs.jobs(owner)]

    @app.get("/api/v1/jobs/{job_id}", tags=[_JOBS])
    def get_job(request: Request, job_id: str, owner: str = Owner) -> dict[str, Any]:
        """State (queued with position, running with step and ETA, done, failed, cancelled)."""
        state = _state(request)
        return _job_view(state, _own_job(state, job_id, owner))

    @app.delete("/api/v1/jobs/{job_id}", tags=[_JOBS])
    def cancel_job(request: Request, job_id: str, owner: str = Owner) -> dict[str, Any]:
        """Cancel a queued job, or interrupt a running one (its finished images are kept)."""
        state = _state(request)
        _own_job(state, job_id, owner)
        job = state.jobs.cancel(job_id, owner)
        assert job is not None
        return _job_view(state, job)

    @app.get(
        "/api/v1/jobs/{job_id}/images/{number}", tags=[_JOBS], responses={200: {"content": {"image/png": {}}}}
    )
    def job_image(request: Request, job_id: str, number: int, owner: str = Owner) -> Response:
        """Image ``number`` (from 0) of a finished job, as a PNG with its ``parameters`` chunk."""
        state = _state(request)
        job = _own_job(state, job_id, owner)
        finished = job.result
        if finished is None or not 0 <= number < len(finished.files):
            raise ApiProblem(
                404,
                f"job {job_id[:80]!r} has no image {number}"
                + ("" if job.finished else " yet (it has not finished)"),
            )
        image, _ = finished.files[number]
        try:
            data = a1111.png_bytes(image, finished.infotexts[number])
        except OSError:
            raise ApiProblem(404, f"image {number} of job {job_id[:80]!r} is no longer on disk") from None
        return Response(data, media_type="image/png")

    @app.get(
        "/api/v1/jobs/{job_id}/events", tags=[_JOBS], responses={200: {"content": {"text/event-stream": {}}}}
    )
    async def job_events(request: Request, job_id: str, owner: str = Owner) -> StreamingResponse:
        """Server-sent events: ``state`` on every change (the job as ``GET /jobs/{id}`` gives it),
        ``preview`` with a base64 PNG when a preview is made, and a last event named after the
        final state (``done``, ``failed``, ``cancelled``), after which the stream ends."""
        state = _state(request)
        job = _own_job(state, job_id, owner)
        return StreamingResponse(
            _events(state, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _events(state: ApiState, job: Job) -> AsyncIterator[bytes]:
    version = -1
    preview = None
    while True:
        current = job.version
        if current == version:
            current = await asyncio.to_thread(state.jobs.wait, job, version, SSE_KEEPALIVE)
            if current == version:
                yield b": waiting\n\n"  # a comment: keeps proxies from closing a quiet stream
                continue
        version = current
        view = _job_view(state, job)
        if job.preview is not None and job.preview is not preview:
            preview = job.preview
            yield _sse("preview", {"id": job.id, "step": job.step, "image": a1111.encode_png(preview)})
        if job.state in FINAL_STATES:
            yield _sse(job.state, view)
            return
        yield _sse("state", view)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


# -- OpenAI ----------------------------------------------------------------------------------


def _openai_routes(app: FastAPI) -> None:
    @app.post("/v1/images/generations", tags=["OpenAI"])
    def generations(request: Request, body: dict[str, Any] = Body(...), owner: str = Owner) -> dict[str, Any]:  # noqa: B008
        """OpenAI's image generation: ``prompt``, ``n``, ``size`` ("WIDTHxHEIGHT"), ``response_format``
        ``b64_json``; ``model`` is an installed model's name (OpenAI's own names mean the default
        model). ``seed`` is an extension: the same seed gives the same image."""
        state = _state(request)
        values = _openai_values(state, body)
        request_ = a1111.check_request(state.engine.fields.new_request("txt2img", values), state.engine)
        job = state.jobs.submit(owner, "txt2img", request_, {"save": False})
        state.jobs.wait_finished(job)
        if job.state == "failed":
            raise ApiProblem(_failure_status(job), job.error or "generation failed")
        finished = job.result
        data = (
            []
            if finished is None
            else [
                {"b64_json": image, "revised_prompt": request_.prompt} for image in a1111.images_of(finished)
            ]
        )
        return {"created": int(time.time()), "data": data}


_OPENAI_IGNORED = frozenset(
    {"quality", "style", "user", "background", "moderation", "output_compression", "output_format"}
)


def _openai_values(state: ApiState, body: dict[str, Any]) -> dict[str, Any]:
    unknown = [
        key
        for key in body
        if key not in ("prompt", "n", "size", "response_format", "model", "seed", "negative_prompt", "steps")
        and key not in _OPENAI_IGNORED
    ]
    if unknown:
        raise InvalidRequestError(f"unknown field {str(unknown[0])[:60]!r}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("prompt must be a non-empty text")
    fmt = body.get("response_format", "b64_json")
    if fmt not in (None, "b64_json"):
        raise InvalidRequestError("response_format must be b64_json (this server does not host image URLs)")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_OPENAI_N:
        raise InvalidRequestError(f"n must be a whole number from 1 to {MAX_OPENAI_N}")
    values: dict[str, Any] = {"prompt": prompt, "batch_size": n}
    size = body.get("size")
    if size not in (None, "auto"):
        width, sep, height = str(size).lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit() or len(str(size)) > 20:
            raise InvalidRequestError(f"size must look like 512x512, got {str(size)[:40]!r}")
        values["width"], values["height"] = int(width), int(height)
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise InvalidRequestError("model must be a model name")
        if model not in OPENAI_ALIASES:
            values["model"] = model
    for key in ("seed", "negative_prompt", "steps"):
        if key in body:
            values[key] = body[key]
    return values


# -- serving ---------------------------------------------------------------------------------


class ApiDispatch:
    """ASGI layer that sends the API's paths to the API app and the rest on (to gradio)."""

    def __init__(self, app: ASGIApp, api: ASGIApp, prefixes: tuple[str, ...] = API_PREFIXES) -> None:
        self.app = app
        self.api = api
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith(self.prefixes):
            await self.api(scope, receive, send)
            return
        await self.app(scope, receive, send)


def mount_api(
    app: Any, demo: Any, service: Any, settings: ApiSettings, args: argparse.Namespace
) -> FastAPI | None:
    """Serve the API on the web app's port (``--api``): its routes go in front of gradio's, behind
    the guards (body size, CORS) already installed. The API's waiting jobs and the web app's
    waiting clicks share ``--queue-size``. Returns the API app, or None when the flags ask for none."""
    if not settings.enabled:
        return None
    from starlette.middleware import Middleware

    from webui.ui.security import BodyLimit, LoginGuard, OriginPolicy

    web_waiting = getattr(demo, "generations_waiting", None)
    api = build_api(
        service,
        settings,
        max_waiting=args.queue_size,
        args=args,
        others_waiting=web_waiting if callable(web_waiting) else (lambda: 0),
    )
    demo.other_generations_waiting = api.state.api.jobs.waiting
    guards = (OriginPolicy, BodyLimit, LoginGuard)
    position = sum(1 for layer in app.user_middleware if getattr(layer, "cls", None) in guards)
    app.user_middleware.insert(position, Middleware(ApiDispatch, api=api))
    if getattr(app, "middleware_stack", None) is not None:
        app.middleware_stack = app.build_middleware_stack()
    close = demo.close

    def close_all(*close_args: Any, **kwargs: Any) -> Any:
        close_api(api)
        return close(*close_args, **kwargs)

    demo.close = close_all
    demo.api_app = api
    return api


class ApiServer:
    """The API served alone (``--nowebui``) by uvicorn on a thread; :meth:`close` stops it."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import uvicorn

        self.app = app
        self.studio_service = app.state.api.service
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, name="latent-studio-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            from webui.ui.server import LaunchRefused

            raise LaunchRefused(f"the API could not listen on {host}:{port} (is the port in use?)")
        self.local_url = f"http://{host}:{port}/"

    def block_thread(self) -> None:
        try:
            while self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            self.close()

    def close(self) -> None:
        close_api(self.app)
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_api_alone(
    args: argparse.Namespace, service: Any, settings: ApiSettings, *, block: bool = True
) -> ApiServer:
    """``--nowebui``: the API alone on ``--port``, behind the same guards as the web app."""
    from webui.ui.server import EVERYWHERE, LOCALHOST, install_server_guards

    api = build_api(service, settings, max_waiting=args.queue_size, args=args)
    install_server_guards(api, args)
    server = ApiServer(api, EVERYWHERE if args.listen else LOCALHOST, args.port)
    if block:
        print(
            f"Latent Studio's API is running at {server.local_url} (docs at {server.local_url}docs)",
            flush=True,
        )
        server.block_thread()
    return server
