"""LoRAs at generation time: AUTOMATIC1111's ``<lora:NAME:WEIGHT>`` prompt tags, files resolved in a LoRA folder, and
their updates fused into a model's weights for the duration of a request.

Fusing: each touched weight ``W`` becomes ``W + sum_i weight_i * delta_i`` (computed in float32, cast once), and a copy
of the original tensor is kept; leaving the context copies every saved tensor back, so the base weights afterwards are
bit-identical to before (no subtract-to-unfuse rounding). :class:`LoraSwitch` lets requests that want the same LoRAs
share the fused weights and makes a request wanting other LoRAs (or none) wait until they are restored.
"""
from __future__ import annotations

import contextlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from openldm.io.lora import Lora, read_lora
from openldm.io.tensor_files import read_header
from openldm.pipelines.tiling import circular_padding

# <lora:NAME> or <lora:NAME:WEIGHT>; NAME may hold anything but ':' and '>'
TAG = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>")
SUFFIX = ".safetensors"
ALIAS_KEY = "ss_output_name"  # where kohya's trainer writes the name it gave a LoRA
CACHED_FILES = 8  # LoRA files a loaded model keeps read (the most recently used)


def extract_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """``prompt`` without its ``<lora:NAME:WEIGHT>`` tags (weight 1 when left out), and the (NAME, WEIGHT) pairs in
    order. A malformed tag raises, naming it."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        name, weight = match[1].strip(), match[2]
        if not name:
            raise ValueError(f"prompt tag {match[0]!r} names no LoRA; write <lora:NAME:WEIGHT>")
        try:
            value = 1.0 if weight is None else float(weight)
        except ValueError:
            raise ValueError(f"prompt tag {match[0]!r}: the weight {weight!r} is not a number; write "
                             "<lora:NAME:WEIGHT>, e.g. <lora:NAME:0.8>") from None
        found.append((name, value))
        return ""

    return TAG.sub(take, prompt), found


def _root(lora_dir: str | Path | None, name: str) -> Path:
    if lora_dir is None:
        raise ValueError(f"the prompt names LoRA {name!r} (<lora:{name}:...>) but no LoRA folder is set; pass "
                         "--lora-dir DIR (lora_dir=)")
    root = Path(lora_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"LoRA folder {str(lora_dir)!r} does not exist")
    return root


def available(lora_dir: str | Path) -> dict[str, Path]:
    """Every LoRA file in ``lora_dir`` (and the folders under it) by the name a prompt tag gives it: the file's
    stem, or its path under the folder without the suffix where two files share a stem; sorted by name."""
    root = Path(lora_dir).resolve()
    files = sorted(p for p in root.rglob(f"*{SUFFIX}") if p.is_file() and p.resolve().is_relative_to(root))
    stems: dict[str, int] = {}
    for p in files:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    named = {p.stem if p.parent == root or stems[p.stem] == 1 else p.relative_to(root).with_suffix("").as_posix(): p
             for p in files}
    return dict(sorted(named.items()))


def metadata(path: str | Path) -> dict[str, str]:
    """A LoRA file's safetensors ``__metadata__`` (trainers' ``ss_*`` keys); empty when the file has none or cannot
    be read as safetensors."""
    try:
        return read_header(path).metadata
    except (OSError, ValueError):
        return {}


def alias(path: str | Path) -> str | None:
    """The name a LoRA's trainer gave it (kohya's ``ss_output_name``), which A1111 also accepts in prompt tags."""
    return metadata(path).get(ALIAS_KEY) or None


def resolve_name(name: str, lora_dir: str | Path | None) -> Path:
    """The file of a prompt tag's NAME: ``NAME.safetensors`` in ``lora_dir`` or, when unique, in a folder under it;
    failing that, as A1111 does, the one file whose trainer named it NAME (its alias). Names may not leave the
    folder."""
    root = _root(lora_dir, name)
    path = (root / f"{name}{SUFFIX}").resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"LoRA name {name!r} points outside the LoRA folder {str(lora_dir)!r}")
    if path.is_file():
        return path
    found = sorted(p for p in root.rglob(f"{name}{SUFFIX}") if p.is_file()) if "/" not in name else []
    named = available(root) if not found else {}
    if not found:
        found = [p for p in named.values() if alias(p) == name]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ValueError(f"LoRA name {name!r} is ambiguous in {str(lora_dir)!r}: {[str(p) for p in found]}; name "
                         "it by its path under the folder, e.g. <lora:SUBFOLDER/NAME:1>")
    known = list(named)
    raise FileNotFoundError(f"no LoRA {name!r} ({name}{SUFFIX}) in {str(lora_dir)!r}; it holds "
                            f"{known[:20] or 'no .safetensors files'}")


def request_loras(prompts: Sequence[str], loras: Sequence[tuple[str | Path, float]],
                  lora_dir: str | Path | None) -> tuple[list[str], list[tuple[Path, float]]]:
    """The prompts with their tags removed, and every LoRA they and ``loras`` (explicit (file, weight) pairs) ask for,
    explicit ones first, as (file, weight)."""
    chosen = [(Path(path), float(weight)) for path, weight in loras]
    cleaned = []
    for prompt in prompts:
        text, tags = extract_tags(prompt)
        cleaned.append(text)
        chosen += [(resolve_name(name, lora_dir), weight) for name, weight in tags]
    return cleaned, chosen


@contextlib.contextmanager
def fused_loras(parts, loras: Sequence[tuple[Lora, float]]) -> Iterator[dict[str, int]]:
    """Within the context, ``parts.unet`` and ``parts.text_encoder`` hold their weights plus each LoRA's update times
    its weight; afterwards the original tensors, bit for bit. Yields the number of layers changed per part."""
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for lora, weight in loras:
        for part, modules in lora.modules.items():
            for name, module in modules.items():
                target = getattr(parts, part).get_submodule(name).weight
                delta = weight * module.delta(target.shape, target.device)
                key = (part, name)
                deltas[key] = deltas[key] + delta if key in deltas else delta
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (part, name), delta in deltas.items():
                weight = getattr(parts, part).get_submodule(name).weight
                saved.append((weight, weight.detach().clone()))
                weight.copy_((weight.float() + delta).to(weight.dtype))
        yield {part: sum(p == part for p, _ in deltas) for part in ("unet", "text_encoder")}
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


BASE = ((), False, None)  # LoraSwitch's key for the model as loaded: no LoRAs, zero padding


class LoraSwitch:
    """The LoRAs a loaded model's weights hold now, and whether its convolutions pad for seamless tiling
    (``openldm.pipelines.tiling``). Requests asking for the same (file, weight) list and tiling run at once on the
    same model; one asking for others waits until they are done and the base model is back. The last
    :data:`CACHED_FILES` files used stay read while their size and modification time hold."""

    def __init__(self, parts):
        self.parts = parts
        self._changed = threading.Condition()
        self._active: tuple = BASE
        self._users = 0
        self._context: contextlib.ExitStack | None = None
        self._cache: OrderedDict[Path, tuple[tuple[int, int], Lora]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def read(self, path: Path) -> Lora:
        """The LoRA at ``path`` read onto this model (cached while the file is unchanged)."""
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._cache_lock:
            cached = self._cache.get(path)
            if cached is None or cached[0] != stamp:
                cached = (stamp, read_lora(path, self.parts.unet, self.parts.text_encoder))
            self._cache[path] = cached
            self._cache.move_to_end(path)
            while len(self._cache) > CACHED_FILES:
                self._cache.popitem(last=False)
            return cached[1]

    @contextlib.contextmanager
    def use(self, loras: Sequence[tuple[str | Path, float]], tiling: bool = False,
            vae: torch.nn.Module | None = None) -> Iterator[list[Lora]]:
        """The model with ``loras`` (file, weight) fused in and, if ``tiling``, circular padding, for one request;
        yields the LoRAs read. ``vae``: the request's VAE when it is not the model's own (padded with the model)."""
        read = [(self.read(Path(path)), float(weight)) for path, weight in loras]
        other_vae = vae if tiling and vae is not None and vae is not self.parts.vae else None
        key = (tuple((lora.path, weight) for lora, weight in read), bool(tiling), other_vae)
        with self._changed:
            while self._users and self._active != key:
                self._changed.wait()
            if self._active != key:
                stack = contextlib.ExitStack()
                stack.enter_context(fused_loras(self.parts, read))
                if tiling:
                    vae_used = self.parts.vae if other_vae is None else other_vae
                    stack.enter_context(circular_padding(self.parts.unet, vae_used))
                self._context, self._active = stack, key
            self._users += 1
        try:
            yield [lora for lora, _ in read]
        finally:
            with self._changed:
                self._users -= 1
                if self._users == 0:
                    if self._context is not None:
                        self._context.close()  # the base weights, bit for bit
                    self._context, self._active = None, BASE
                    self._changed.notify_all()
