"""The server's models and its one job queue: the page, the A1111 API and the native routes all submit here.

- :class:`ModelPool`: the models served (a name per source), each loaded once on first use behind the generation
  interface and kept; switching the current model never reloads one that is loaded.
- :class:`JobQueue`: one worker thread runs jobs in order. A job is a resolved :class:`GenerationRequest` repeated
  ``iterations`` times (A1111's ``n_iter``; iteration k uses seed + k * batch size, or with a variation seed
  subseed + k * batch size, as A1111 does); it reports step,
  total and ETA, keeps the sampler's latest estimate for a preview made on demand, and stops on ``interrupt``
  (the whole job) or ``skip`` (the current iteration), returning what was made so far.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from openldm.io.run_dir import is_run_dir, resolve_source
from openldm.pipelines.common import GenerationParams
from openldm.pipelines.generate import GenerationRequest, Generator, Progress
from openldm.pipelines.sources import load_generator

FINISHED = ("done", "interrupted", "failed")


class UnknownModel(KeyError):
    """A model name the server does not serve; the message lists those it does."""

    def __str__(self) -> str:
        return str(self.args[0])


def model_sources(models: list[str | Path] | None) -> dict[str, str]:
    """Name -> source for ``openldm serve --model ...``: None serves the bundled models (the default first); a folder that is no
    model itself serves every model found under it. Names are the file's stem or the folder's name (made unique)."""
    from openldm.bundled import BUNDLED, available
    from openldm.io.run_dir import find_model_sources, resolve_source

    names: dict[str, str] = {}
    for given in models or available():
        if str(given) in BUNDLED and not Path(given).exists():
            found, label = [Path(str(given))], str(given)
        else:
            found, label = find_model_sources(resolve_source(given)), None
            if not found:
                raise FileNotFoundError(f"no models under {str(given)!r} (run directories, SD .safetensors / .ckpt "
                                        "files, diffusers folders)")
        for path in found:
            base = label or (path.stem if path.is_file() else path.name)
            name = next(n for n in itertools.chain([base], (f"{base}-{i}" for i in itertools.count(2)))
                        if n not in names)
            names[name] = str(path)
    return names


class ModelPool:
    """The served models by name, loaded lazily (one load per model, even under concurrent first requests).
    ``lora_dir``: where Stable Diffusion models find the LoRAs that prompts name (``<lora:NAME:WEIGHT>``);
    ``vae``: a VAE they take in place of their own; ``vae_dir``: the VAEs requests may name; ``preview_vae``: what
    their live previews decode with. ``compile``:
    torch.compile each loaded model's UNet (and decoder off a CPU; kept with the model, so compiled once)."""

    def __init__(self, sources: dict[str, str], *, device: str = "cpu", dtype: str = "float32",
                 lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None,
                 compile: bool = False, vae: str | Path | None = None, vae_dir: str | Path | None = None,
                 preview_vae: str | Path | None = None):
        if not sources:
            raise ValueError("a server needs at least one model")
        self.sources = dict(sources)
        self.device, self.dtype, self.compile = device, dtype, compile
        # for the Stable Diffusion models among them
        self.lora_dir, self.embeddings_dir, self.vae, self.vae_dir = lora_dir, embeddings_dir, vae, vae_dir
        self.preview_vae = preview_vae
        self.current = next(iter(self.sources))
        self._loaded: dict[str, Generator] = {}
        self._locks = {name: threading.Lock() for name in self.sources}

    def names(self) -> list[str]:
        return list(self.sources)

    def name_of(self, text: str | None) -> str:
        """A served model's name from a name, an A1111 checkpoint title ("name [hash]") or its source; None is the
        current model."""
        if text is None or text == "":
            return self.current
        stripped = text.rsplit(" [", 1)[0] if text.endswith("]") else text
        for name, source in self.sources.items():
            if stripped in (name, source) or Path(source).name == stripped:
                return name
        raise UnknownModel(f"model {text!r} is not served here; served: {', '.join(self.sources)}")

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def get(self, name: str | None = None) -> Generator:
        name = self.name_of(name)
        with self._locks[name]:
            if name not in self._loaded:
                source = self.sources[name]
                sd = not is_run_dir(resolve_source(source))
                self._loaded[name] = load_generator(source, device=self.device, dtype=self.dtype,
                                                    lora_dir=self.lora_dir if sd else None,
                                                    embeddings_dir=self.embeddings_dir if sd else None,
                                                    vae=self.vae if sd else None,
                                                    vae_dir=self.vae_dir if sd else None,
                                                    preview_vae=self.preview_vae if sd else None,
                                                    compile=self.compile)
            return self._loaded[name]

    def select(self, name: str) -> str:
        """Make ``name`` the current model (loading it if needed); returns its name."""
        name = self.name_of(name)
        self.get(name)
        self.current = name
        return name


@dataclass(eq=False)
class Job:
    """One submitted request and everything the progress routes report about it."""

    id: str
    model: str
    generator: Generator
    request: GenerationRequest  # resolved against the model
    iterations: int = 1
    state: str = "queued"  # queued | running | done | interrupted | failed
    iteration: int = 0
    step: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    images: list[Image.Image] = field(default_factory=list)
    params: list[GenerationParams] = field(default_factory=list)
    error: str | None = None
    failure: Exception | None = None  # what ``error`` says, kept so that a bad request is answered as one
    interrupt_flag: bool = False
    skip_flag: bool = False
    latest: torch.Tensor | None = None  # the sampler's latest estimate of the clean sample
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def progress(self) -> float:
        if self.state in FINISHED:
            return 1.0
        if not self.total:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.total) / self.iterations)

    @property
    def eta_seconds(self) -> float | None:
        if self.state != "running" or self.started is None or self.progress <= 0:
            return None
        elapsed = time.time() - self.started
        return elapsed / self.progress - elapsed

    def preview(self) -> Image.Image | None:
        latest = self.latest
        return None if latest is None else self.generator.preview(latest)

    def request_of(self, iteration: int) -> GenerationRequest:
        """Iteration k's request, as A1111 counts: the seed moves on by k batches, or with a variation seed the
        variation seed does (the seed stays, so every image is a variation of the one image)."""
        r, step = self.request, iteration * self.request.num_images
        return replace(r, subseed=r.subseed + step) if r.subseed_strength else replace(r, seed=r.seed + step)

    def _run(self) -> None:
        self.state, self.started = "running", time.time()
        try:
            for k in range(self.iterations):
                self.iteration, self.step, self.skip_flag = k, 0, False
                request = self.request_of(k)
                result = self.generator.generate(request, on_progress=self._on_progress,
                                                 should_stop=lambda: self.interrupt_flag or self.skip_flag)
                self.images += result.images
                self.params += result.params
                if self.interrupt_flag:
                    break
            self.state = "interrupted" if self.interrupt_flag else "done"
        except Exception as e:  # a failed job reports why; the worker goes on with the next
            self.state, self.error, self.failure = "failed", f"{type(e).__name__}: {e}", e
        finally:
            self.latest, self.finished = None, time.time()
            self.done.set()

    def _on_progress(self, p: Progress) -> None:
        self.step, self.total, self.latest = p.step, p.total, p.denoised


class JobQueue:
    """One worker thread over a FIFO of jobs; finished jobs are kept (the last ``keep``) for their results."""

    def __init__(self, keep: int = 200):
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._keep = keep
        self._closed = False
        self.running: Job | None = None
        self.last: Job | None = None  # the latest job to start (A1111's progress reports it)
        self._worker = threading.Thread(target=self._work, name="openldm-worker", daemon=True)
        self._worker.start()

    def submit(self, model: str, generator: Generator, request: GenerationRequest, iterations: int = 1) -> Job:
        with self._cond:
            if self._closed:
                raise RuntimeError("the job queue is closed")
            job = Job(f"job-{next(self._ids)}", model, generator, request, iterations)
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].state not in FINISHED:
                    break
                self._jobs.pop(oldest)
            self._queue.append(job)
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 while running or finished; n if n - 1 jobs wait before it."""
        with self._cond:
            return next((i + 1 for i, j in enumerate(self._queue) if j is job), 0)

    def queued(self) -> list[Job]:
        with self._cond:
            return list(self._queue)

    def interrupt(self, job: Job | None = None) -> bool:
        """Stop ``job`` (default: the running one): a queued job is dropped, a running one stops after its current
        step and keeps what it made. False if there was nothing to stop."""
        with self._cond:
            job = job or self.running
            if job is None or job.state in FINISHED:
                return False
            job.interrupt_flag = True
            if job in self._queue:
                self._queue.remove(job)
                job.state, job.finished = "interrupted", time.time()
                job.done.set()
            return True

    def skip(self) -> bool:
        """End the running job's current iteration; the next one starts."""
        job = self.running
        if job is None:
            return False
        job.skip_flag = True
        return True

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            for job in list(self._queue):
                job.interrupt_flag = True
            if self.running is not None:
                self.running.interrupt_flag = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for job in self._queue:
                        job.state = "interrupted"
                        job.done.set()
                    self._queue.clear()
                    return
                job = self._queue.popleft()
                self.running = self.last = job
            job._run()
            with self._cond:
                self.running = None
