"""``openldm serve``: one FastAPI app with the page (static files), AUTOMATIC1111's API under ``/sdapi/v1`` and
openldm's own routes under ``/openldm``, all over one :class:`~openldm.web.jobs.JobQueue`.

Native routes (what A1111's API cannot say: class labels, the conditions of runs trained here, job ids):

====================================  ==========================================================================
GET  /openldm/models                  served models: name, source, loaded; and the current one
GET  /openldm/models/{name}           a model's capabilities (loads it), with A1111 sampler labels
POST /openldm/jobs                    queue a generation request -> {"id"}
GET  /openldm/jobs/{id}               state, position, step / total, progress, ETA, then images and infotexts
GET  /openldm/jobs/{id}/preview       the running job's current estimate as a PNG (404 before its first step)
POST /openldm/jobs/{id}/interrupt     stop it (queued: dropped; running: keeps what it made)
GET  /openldm/queue                   the running job and those waiting
POST /openldm/png-info                a PNG's parameters, parsed into the request fields
====================================  ==========================================================================

Bad requests answer 4xx with ``{"error": message, "field": name, "detail": message}``; with ``api_auth`` every route
asks for HTTP Basic credentials (401 without them).
"""
from __future__ import annotations

import base64
import io
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict

from openldm.io.files import SHORT_HASH
from openldm.pipelines.common import GenerationParams
from openldm.pipelines.generate import GenerationRequest, RequestError
from openldm.pipelines.hires import UPSCALERS, hires_size
from openldm.pipelines.styles import Style, read_styles
from openldm.pipelines.vaes import OWN
from openldm.pipelines.vaes import resolve as resolve_vae
from openldm.web import a1111
from openldm.web.jobs import Job, JobQueue, ModelPool, UnknownModel, model_sources

STATIC = Path(__file__).parent / "static"
MAX_ITERATIONS = 100


class JobRequest(BaseModel):
    """``POST /openldm/jobs``: the generation request's fields (None = the model's recommended value), the model by
    name, images as base64 / data URLs, and ``iterations`` (A1111's n_iter). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    prompt: str | None = None
    negative_prompt: str = ""
    class_label: int | str | None = None
    seed: int = -1
    sampler: str | None = None
    karras: bool | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    iterations: int = 1
    init_image: str | None = None
    strength: float | None = None
    mask: str | None = None
    paste_back: bool = False
    inputs: dict[str, Any] = {}
    clip_skip: int = 1
    prompt_weighting: str = "none"
    guidance_interval: tuple[float, float] | None = None  # the step cutters (issue 16): GenerationRequest's names
    deepcache_interval: int = 1
    token_merging_ratio: float = 0.0
    token_merging_max_downsample: int = 1
    hires_scale: float | None = None  # the hires fix: GenerationRequest's names
    hires_upscaler: str | None = None
    hires_steps: int | None = None
    tiling: bool = False
    vae: str | None = None  # a VAE of the server's --vae-dir by name (None: the model's)
    subseed: int = -1  # A1111's variation seed (-1: drawn) when subseed_strength > 0
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None


class PngInfoRequest(BaseModel):
    image: str


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = None


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field, "detail": message}, status_code=status)


def _parse_auth(api_auth: str | None) -> list[tuple[str, str]]:
    if not api_auth:
        return []
    pairs = [pair.split(":", 1) for pair in api_auth.split(",") if pair.strip()]
    if any(len(p) != 2 or not p[0] for p in pairs):
        raise ValueError("api_auth takes USER:PASS pairs separated by commas")
    return [(user.strip(), password) for user, password in pairs]


def _authorized(header: str | None, credentials: list[tuple[str, str]]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    ok = False
    for u, p in credentials:  # compare every pair in constant time
        ok |= secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
    return ok


def create_app(models: list[str | Path] | None = None, *, api_auth: str | None = None,
               cors_allow_origins: list[str] | None = None, max_batch: int = 8, max_pixels: int = 1024 * 1024,
               device: str = "cpu", dtype: str = "float32", preload: bool = False,
               lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None,
               compile: bool = False, styles_file: str | Path | None = None, vae: str | Path | None = None,
               vae_dir: str | Path | None = None, preview_vae: str | Path | None = None) -> FastAPI:
    """The app serving ``models`` (see ``model_sources``; None = the bundled model). ``app.state.pool`` holds the
    models, ``app.state.queue`` the job queue (``close()`` it to stop its worker). ``preload`` loads the first
    model now (a bad model fails here, not at the first request). ``lora_dir``: where prompts' ``<lora:NAME:W>``
    tags find their files; ``vae``: a VAE the Stable Diffusion models take in place of their own; ``vae_dir``: the
    VAEs requests may name (A1111's ``sd_vae``: ``/sdapi/v1/sd-vae`` lists them); ``preview_vae``: what their live
    previews decode with (a TAESD: A1111's "TAESD" live preview); ``embeddings_dir``:
    textual-inversion embeddings for the Stable Diffusion models served; ``compile``: torch.compile each model's
    UNet, and decoder off a CPU (the graphs stay with the loaded models); ``styles_file``: A1111's styles.csv, which A1111 requests name in ``styles`` (read at each request, so
    edits apply at once; a bad file fails here)."""
    if vae_dir is not None and not Path(vae_dir).is_dir():
        raise ValueError(f"VAE folder {str(vae_dir)!r} does not exist")
    pool = ModelPool(model_sources(models), device=device, dtype=dtype, lora_dir=lora_dir,
                     embeddings_dir=embeddings_dir, compile=compile, vae=vae, vae_dir=vae_dir,
                     preview_vae=preview_vae)
    if preload:
        pool.get()

    def styles() -> dict[str, Style]:
        return read_styles(styles_file) if styles_file is not None else {}

    styles()
    queue = JobQueue()
    credentials = _parse_auth(api_auth)
    app = FastAPI(title="openldm", version=a1111.VERSION.split()[-1], docs_url="/docs")
    app.state.pool, app.state.queue = pool, queue
    app.router.add_event_handler("shutdown", queue.close)

    # ------------------------------------------------------------------------------------ auth, CORS, errors
    if credentials:
        @app.middleware("http")
        async def basic_auth(request: Request, call_next):
            if request.method == "OPTIONS" and cors_allow_origins:  # CORS preflights carry no credentials
                return await call_next(request)
            if not _authorized(request.headers.get("authorization"), credentials):
                return JSONResponse({"error": "authentication required", "detail": "Not authenticated"},
                                    status_code=401, headers={"WWW-Authenticate": 'Basic realm="openldm"'})
            return await call_next(request)

    if cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_allow_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return _error(422, str(e), e.field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg', 'invalid value')}" if field else first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}"
        return _error(422, message, field)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return JSONResponse({"error": str(e.detail), "field": None, "detail": e.detail}, status_code=e.status_code,
                            headers=e.headers)

    # ------------------------------------------------------------------------------------------- submitting
    def model_name(text: str | None, field: str) -> str:
        try:
            return pool.name_of(text)
        except UnknownModel as e:
            raise RequestError(field, str(e)) from None

    def submit(name: str, request: GenerationRequest, iterations: int = 1, batch_field: str = "num_images") -> Job:
        generator = pool.get(name)
        caps = generator.capabilities
        if request.num_images > max_batch:
            raise RequestError(batch_field, f"{batch_field}={request.num_images} is more than this server's "
                               f"--max-batch {max_batch}")
        if isinstance(iterations, bool) or not 1 <= iterations <= MAX_ITERATIONS:
            raise RequestError("n_iter", f"n_iter={iterations} must be in 1..{MAX_ITERATIONS}")
        for key, value in list(request.inputs.items()):
            declared = next((f for f in caps.inputs if f.name == key), None)
            if declared is not None and declared.type in ("image", "label_map") and isinstance(value, str):
                request.inputs[key] = a1111.decode_image(value, f"inputs.{key}")
        r = request.resolve(caps)
        if isinstance(r.init_image, Image.Image) and isinstance(r.mask, Image.Image):
            a1111.check_mask_size(r.mask, r.init_image)
        width, height = (r.width, r.height) if r.width else (r.init_image.size if r.init_image else (0, 0))
        if r.hires_scale is not None:  # the hires pass's size bounds the work
            width, height = hires_size(width, height, r.hires_scale)
        if width * height * r.num_images > max_pixels:
            raise RequestError("width", f"{width}x{height} x {r.num_images} images = {width * height * r.num_images}"
                               f" pixels is more than this server's --max-pixels {max_pixels}")
        return queue.submit(name, generator, r, iterations)

    def job_or_404(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    def finished(job: Job) -> Job:
        job.done.wait()
        if isinstance(job.failure, RequestError):  # found only at generation time (a prompt's LoRA tag): a 422
            raise job.failure
        if job.state == "failed":
            raise HTTPException(500, f"generation failed: {job.error}")
        return job

    # ------------------------------------------------------------------------------------------- the page
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --------------------------------------------------------------------------------------- native routes
    @app.get("/openldm/models")
    def list_models():
        return {"models": [{"name": n, "source": pool.sources[n], "loaded": pool.is_loaded(n)} for n in pool.names()],
                "current": pool.current}

    @app.get("/openldm/models/{name}")
    def model_capabilities(name: str):
        from openldm.samplers import a1111_name

        try:
            caps = pool.get(pool.name_of(name)).capabilities
        except UnknownModel as e:
            raise HTTPException(404, str(e)) from None
        return {**caps.to_dict(), "sampler_labels": {s: a1111_name(s) for s in caps.samplers},
                "hires_upscalers": list(UPSCALERS) if caps.hires_fix else [],
                "vaes": [v["model_name"] for v in a1111.vaes(pool.vae_dir)] if caps.vae_choice else []}

    @app.post("/openldm/jobs")
    def create_job(body: JobRequest):
        name = model_name(body.model, "model")
        fields = body.model_dump(exclude={"model", "iterations", "seed", "subseed", "init_image", "mask"})
        request = GenerationRequest(**fields, seed=a1111.random_seed(body.seed),
                                    subseed=a1111.random_seed(body.subseed) if body.subseed_strength else None)
        if body.init_image is not None:
            request.init_image = a1111.decode_image(body.init_image, "init_image")
        if body.mask is not None:
            request.mask = a1111.decode_image(body.mask, "mask").convert("L")
        job = submit(name, request, body.iterations)
        return {"id": job.id, "position": queue.position(job)}

    def job_state(job: Job) -> dict[str, Any]:
        done = job.state in ("done", "interrupted")
        return {"id": job.id, "model": job.model, "state": job.state, "position": queue.position(job),
                "iteration": job.iteration, "iterations": job.iterations, "step": job.step, "total": job.total,
                "progress": job.progress, "eta_seconds": job.eta_seconds, "error": job.error,
                "images": ["data:image/png;base64," + a1111.encode_png(im, p) for im, p in zip(job.images, job.params)]
                if done else [],
                "infotexts": [p.to_text() for p in job.params] if done else [],
                "seeds": [p.seed for p in job.params] if done else []}

    @app.get("/openldm/jobs/{job_id}")
    def get_job(job_id: str):
        return job_state(job_or_404(job_id))

    @app.get("/openldm/jobs/{job_id}/preview")
    def job_preview(job_id: str):
        image = job_or_404(job_id).preview()
        if image is None:
            raise HTTPException(404, "no preview yet: the job has not taken a step (or has finished)")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/openldm/jobs/{job_id}/interrupt")
    def interrupt_job(job_id: str):
        return {"ok": queue.interrupt(job_or_404(job_id))}

    def summary(job: Job) -> dict[str, Any]:
        return {"id": job.id, "model": job.model, "state": job.state, "position": queue.position(job),
                "step": job.step, "total": job.total, "progress": job.progress,
                "prompt": job.request.prompt, "num_images": job.request.num_images}

    @app.get("/openldm/queue")
    def view_queue():
        running = queue.running
        return {"running": summary(running) if running is not None else None,
                "queued": [summary(j) for j in queue.queued()]}

    def read_png(data: str) -> Image.Image:
        return a1111.decode_image(data, "image")

    @app.post("/openldm/png-info")
    def native_png_info(body: PngInfoRequest):
        text = read_png(body.image).info.get("parameters")
        if text is None:
            raise RequestError("image", "the image has no 'parameters' text chunk; it was not written by openldm or "
                               "A1111")
        try:
            params = GenerationParams.from_text(text)
        except ValueError as e:
            raise RequestError("image", str(e)) from None
        return {"text": text, "params": asdict(params)}

    # ----------------------------------------------------------------------------------------- A1111 API
    def a1111_generate(body: a1111.Txt2ImgRequest):
        name = model_name(a1111.model_override(body), "override_settings.sd_model_checkpoint")
        caps = pool.get(name).capabilities
        weighting = "a1111" if "a1111" in caps.prompt_weightings else "none"
        vae = app.state.options["sd_vae"] if caps.vae_choice else None  # the setting is for models that take one
        request = a1111.to_request(body, weighting, styles(), vae)
        job = finished(submit(name, request, body.n_iter, batch_field="batch_size"))
        return a1111.response(body, job.images, job.params, name, [p.seed for p in job.params])

    @app.post("/sdapi/v1/txt2img")
    def txt2img(body: a1111.Txt2ImgRequest):
        return a1111_generate(body)

    @app.post("/sdapi/v1/img2img")
    def img2img(body: a1111.Img2ImgRequest):
        result = a1111_generate(body)
        if not body.include_init_images:
            result["parameters"]["init_images"] = None
            result["parameters"]["mask"] = None
        return result

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        job = queue.running
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": {
                "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": None}
        image = None if skip_current_image else job.preview()
        current = None
        if image is not None:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            current = base64.b64encode(buffer.getvalue()).decode()
        return {"progress": job.progress, "eta_relative": job.eta_seconds or 0.0, "state": {
            "skipped": job.skip_flag, "interrupted": job.interrupt_flag, "stopping_generation": False,
            "job": job.id, "job_count": 1 + len(queue.queued()), "job_timestamp": f"{job.created:.0f}",
            "job_no": job.iteration, "sampling_step": job.step, "sampling_steps": job.total},
            "current_image": current, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        queue.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        queue.skip()
        return {}

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return a1111.SCHEDULERS

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        """A1111's listing; ``hash`` / ``sha256`` of the checkpoint files loaded so far (hashing a model not yet
        loaded would read gigabytes for a listing)."""
        def sha256(name: str) -> str | None:
            return getattr(pool.get(name), "model_sha256", None) if pool.is_loaded(name) else None

        listed = []
        for n in pool.names():
            digest = sha256(n)
            title = f"{n} [{digest[:SHORT_HASH]}]" if digest else n  # A1111's title: "name [short hash]"
            listed.append({"title": title, "model_name": n, "hash": digest[:SHORT_HASH] if digest else None,
                           "sha256": digest, "filename": pool.sources[n], "config": None})
        return listed

    @app.get("/sdapi/v1/options")
    def get_options():
        return {**app.state.options, "sd_model_checkpoint": pool.current}

    app.state.options = {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
                         "sd_vae": OWN[0]}

    @app.post("/sdapi/v1/options")
    def set_options(body: Options):
        if body.sd_model_checkpoint is not None:
            pool.select(model_name(body.sd_model_checkpoint, "sd_model_checkpoint"))
        chosen = (body.model_extra or {}).get("sd_vae")
        if chosen is not None and chosen not in OWN:
            try:
                resolve_vae(str(chosen), pool.vae_dir)
            except (ValueError, FileNotFoundError) as e:
                raise RequestError("sd_vae", str(e)) from None
        app.state.options.update({k: v for k, v in (body.model_extra or {}).items() if k in app.state.options})

    @app.post("/sdapi/v1/png-info")
    def png_info(body: PngInfoRequest):
        return a1111.png_info(read_png(body.image))

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return a1111.embeddings(getattr(pool.get(), "embeddings", {}))

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles():
        return a1111.prompt_styles(styles())

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        return a1111.upscalers()

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return a1111.latent_upscale_modes()

    @app.get("/sdapi/v1/loras")
    def loras():
        return a1111.loras(pool.lora_dir)

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return a1111.vaes(pool.vae_dir)

    @app.post("/sdapi/v1/refresh-vae")
    def refresh_vae():
        return None  # /sdapi/v1/sd-vae reads the folder at each call

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return None  # /sdapi/v1/loras reads the folder at each call; nothing is cached to refresh

    @app.get("/internal/ping")
    def ping():
        return {}

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    return app


def serve(models: list[str] | None = None, *, host: str = "127.0.0.1", port: int = 7860, **options: Any) -> None:
    """Serve until interrupted (Ctrl-C); ``options`` are :func:`create_app`'s, the first model preloaded."""
    import uvicorn

    app = create_app(models, preload=True, **options)
    print(f"openldm serve: {', '.join(app.state.pool.names())} on http://{host}:{port}/ (A1111 API under /sdapi/v1)",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
