"""Original (CompVis) Stable Diffusion single files, SD v1 and SD 2.x: ``.safetensors`` or ``.ckpt``.

One state dict holds three models under prefixes: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(KL autoencoder) and the text tower: ``cond_stage_model.transformer.*`` (SD v1: OpenAI CLIP ViT-L/14, quick-GELU)
or ``cond_stage_model.model.*`` (SD 2.x: OpenCLIP ViT-H/14, GELU, read at its penultimate layer; the file is told
to be SD 2 by these keys). Everything else is ignored: the DDPM schedule buffers (``betas``, ``alphas_cumprod``,
...), ``model_ema.*`` (unless ``use_ema``), ``loss.*``. Configs come from tensor shapes (SD conventions fill in
what shapes cannot say: 8 UNet heads in SD v1, heads of width 64 in SD 2, 32 GroupNorm groups, CLIP heads of width
64), or from ``openldm.*`` metadata when openldm wrote the file.

What the weights cannot say (eps or v prediction, the schedule) comes, in this order, from the ``prediction``
argument, the CompVis inference YAML beside the file (same stem, ``.yaml``: ``model.params.parameterization``,
``linear_start``, ``linear_end``, ``timesteps``; see :func:`sidecar_settings`), openldm's metadata, and else SD
v1's defaults (eps). An SD 2 file with none of them is refused: SD 2.x ships both eps (512 px, "-base") and v
(768 px) models with identical keys. The tokenizer is CLIP's; SD 2's pads with "!" (id 0) as OpenCLIP does.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from openldm.config import from_dict, to_dict
from openldm.diffusion.schedules import ScheduleConfig, make_alphas_cumprod, make_betas
from openldm.io.components import (
    PREDICTIONS,
    StableDiffusionComponents,
    assign_module,
    read_tensors,
    settings_from_dict,
)
from openldm.io.files import atomic_path
from openldm.io.keymaps import autoencoder as vae_keys
from openldm.io.keymaps import clip as clip_keys
from openldm.io.keymaps import unet as unet_keys
from openldm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from openldm.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from openldm.models.unet import UNet, UNetConfig
from openldm.tokenizers.clip_bpe import CLIPTokenizer

UNET_PREFIX = unet_keys.ORIGINAL_PREFIX  # model.diffusion_model.
VAE_PREFIX = vae_keys.ORIGINAL_PREFIX  # first_stage_model.
TEXT_PREFIX = clip_keys.ORIGINAL_PREFIX  # cond_stage_model.transformer.
OPEN_CLIP_PREFIX = clip_keys.OPEN_CLIP_PREFIX  # cond_stage_model.model. (SD 2)
EMA_PREFIX = "model_ema."
CLIP_HEAD_DIM = 64  # CLIP text towers use heads of width 64 (ViT-L/14: 768 / 12, ViT-H/14: 1024 / 16)
SD2_UNET_HEAD_DIM = 64  # SD 2.x UNets: num_head_channels: 64 in every CompVis v2 YAML
SD2_PAD_ID = 0  # OpenCLIP's tokenizer pads with 0 ("!"), not with the end token
SIDECAR_SUFFIX = ".yaml"
# CompVis LatentDiffusion parameterization and beta_schedule -> ours (CompVis' "linear" is linear in sqrt(beta)).
_PARAMETERIZATIONS = {"eps": "eps", "v": "v"}
_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
# Metadata openldm adds to the files it writes (configs, sampling settings); other writers' files lack it.
META_SETTINGS, META_UNET, META_VAE, META_TEXT = "openldm.sd", "openldm.unet", "openldm.vae", "openldm.text_encoder"
META_PAD_ID = "openldm.pad_id"  # the tokenizer's padding id when it is not the end token (an SD 2 model)


def ema_key(unet_key: str) -> str:
    """The ``model_ema.*`` name of a UNet key: CompVis' LitEma stores ``model.X.Y`` as ``model_ema.XY`` (the
    name after ``model.`` with its dots removed, buffers cannot have dots in their names)."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def _layout_error(path: Path, keys: list[str], problem: str) -> ValueError:
    prefixes: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2])
        prefixes[head] = prefixes.get(head, 0) + 1
    seen = ", ".join(f"{p} ({n})" for p, n in sorted(prefixes.items())[:20]) or "no tensors"
    return ValueError(f"{str(path)!r} is not a Stable Diffusion single file in the CompVis layout: {problem}. "
                      f"Expected {UNET_PREFIX}*, {VAE_PREFIX}* and {TEXT_PREFIX}* (SD v1) or {OPEN_CLIP_PREFIX}* "
                      f"(SD 2.x); key prefixes seen: {seen}")


def clip_config_from_original(state: Mapping[str, torch.Tensor], hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    """A CLIP text config from the shapes of its state dict under our names (heads of width 64); ``hidden_act``:
    quick_gelu for OpenAI's CLIP (SD v1), gelu for OpenCLIP (SD 2)."""
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    positions = state["embeddings.position_embedding.weight"].shape[0]
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    return CLIPTextConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_size=hidden,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
                          intermediate_size=intermediate, hidden_act=hidden_act)


def sidecar_path(path: str | Path) -> Path:
    """Where the CompVis inference YAML of a single file lies: same folder and stem, ``.yaml``."""
    return Path(path).with_suffix(SIDECAR_SUFFIX)


def sidecar_settings(path: str | Path) -> dict:
    """What the CompVis inference YAML beside ``path`` says (``{}`` without one): ``prediction`` from
    ``model.params.parameterization`` (CompVis' default: eps); ``schedule`` from ``linear_start``, ``linear_end``,
    ``timesteps`` and ``beta_schedule`` when any is there (missing ones keep SD's values, so a YAML naming only
    the parameterization works); ``text_layer`` ("last" | "penultimate") from an OpenCLIP ``cond_stage_config``'s
    ``params.layer`` (its default: last)."""
    yaml_path = sidecar_path(path)
    if not yaml_path.is_file():
        return {}
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{yaml_path}: not valid YAML ({str(e).splitlines()[0]}); fix it or remove it") from None
    model = data.get("model") if isinstance(data, Mapping) else None
    params = model.get("params") if isinstance(model, Mapping) else None
    if not isinstance(params, Mapping):
        problem = "no model.params mapping; a CompVis inference YAML (such as SD 2's v2-inference-v.yaml) has one"
        raise ValueError(f"{yaml_path}: {problem}")  # noqa: TRY004 (bad file content, not a bad argument type)
    parameterization = params.get("parameterization", "eps")
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(f"{yaml_path}: model.params.parameterization={parameterization!r}; accepted: "
                         f"{', '.join(_PARAMETERIZATIONS)}")
    out: dict = {"prediction": _PARAMETERIZATIONS[parameterization]}
    beta = params.get("beta_schedule", "linear")
    if beta not in _BETA_SCHEDULES:
        raise ValueError(f"{yaml_path}: model.params.beta_schedule={beta!r}; accepted: {', '.join(_BETA_SCHEDULES)}")
    if any(k in params for k in ("linear_start", "linear_end", "timesteps", "beta_schedule")):
        sd = ScheduleConfig()
        out["schedule"] = ScheduleConfig(kind=_BETA_SCHEDULES[beta],
                                         num_train_steps=int(params.get("timesteps", sd.num_train_steps)),
                                         beta_start=float(params.get("linear_start", sd.beta_start)),
                                         beta_end=float(params.get("linear_end", sd.beta_end)))
    cond = params.get("cond_stage_config")
    if isinstance(cond, Mapping) and str(cond.get("target", "")).endswith("FrozenOpenCLIPEmbedder"):
        cond_params = cond.get("params")
        layer = cond_params.get("layer", "last") if isinstance(cond_params, Mapping) else "last"
        if layer not in ("last", "penultimate"):
            raise ValueError(f"{yaml_path}: cond_stage_config.params.layer={layer!r}; accepted: last, penultimate")
        out["text_layer"] = layer
    return out


def is_sd2_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether single-file tensors hold SD 2's OpenCLIP text tower (``cond_stage_model.model.*``)."""
    return any(k.startswith(OPEN_CLIP_PREFIX) for k in state)


def load_original(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  unsafe_load: bool = False, use_ema: bool = False,
                  prediction: str | None = None) -> StableDiffusionComponents:
    """Load an SD v1 or SD 2.x single file. ``use_ema`` takes the UNet from ``model_ema.*`` when the file has it.
    ``prediction`` (eps | v) overrides what the sidecar YAML or the file's metadata say (see the module doc)."""
    path = Path(path)
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; accepted: {', '.join(PREDICTIONS)}")
    wanted = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, EMA_PREFIX) if use_ema else (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    state, meta = read_tensors(path, unsafe_load=unsafe_load, 
                               keep=lambda k: k.startswith((*wanted, OPEN_CLIP_PREFIX)) or k == "alphas_cumprod")
    if "openldm.kind" in meta:
        raise ValueError(f"{str(path)!r} is a single openldm model file ({meta['openldm.kind']}), not a Stable "
                         "Diffusion checkpoint; load it with openldm.io.native.load_model")
    keys = [k for k in state if k != "alphas_cumprod"]
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        all_keys = list(read_tensors(path, unsafe_load=unsafe_load)[0]) if not keys else keys
        raise _layout_error(path, all_keys, f"no UNet weights ({UNET_PREFIX}*)")
    sd2 = is_sd2_state(state)
    for prefix, what in ((VAE_PREFIX, "autoencoder"), (OPEN_CLIP_PREFIX if sd2 else TEXT_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in keys):
            raise _layout_error(path, keys, f"no {what} weights ({prefix}*)")
    sidecar = sidecar_settings(path)
    settings = settings_from_dict(json.loads(meta[META_SETTINGS])) if META_SETTINGS in meta else {}
    settings.update({k: v for k, v in sidecar.items() if k != "text_layer"})
    if prediction is not None:
        settings["prediction"] = prediction
    if sd2 and "prediction" not in settings:
        raise ValueError(f"{str(path)!r} is an SD 2.x single file, and SD 2.x has eps models (512 px, '-base') and "
                         "v models (768 px) with the same keys: say which with --prediction-type eps|v "
                         f"(prediction= in Python), or put the model's CompVis inference YAML beside it as "
                         f"{sidecar_path(path).name!r}")

    unet_state = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if use_ema:
        ema = {k: ema_key(UNET_PREFIX + k) for k in unet_state}
        if all(e in state for e in ema.values()):
            unet_state = {k: state[e] for k, e in ema.items()}
        else:
            warnings.warn(f"{path}: use_ema requested but the file has no complete model_ema.* UNet weights; "
                          "using model.diffusion_model.*")
    vae_state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    if sd2:  # the penultimate layer unless the YAML says "last"
        blocks = clip_keys.open_clip_blocks(state)
        text_state = clip_keys.from_open_clip(state, blocks if sidecar.get("text_layer") == "last" else blocks - 1)
    else:
        text_state = clip_keys.from_original(state)

    unet_cfg = from_dict(UNetConfig, json.loads(meta[META_UNET])) if META_UNET in meta \
        else unet_keys.unet_config_from_original(unet_state, head_dim=SD2_UNET_HEAD_DIM if sd2 else None)
    vae_cfg = from_dict(AutoencoderKLConfig, json.loads(meta[META_VAE])) if META_VAE in meta \
        else vae_keys.autoencoder_config_from_original(vae_state)
    if not isinstance(vae_cfg, AutoencoderKLConfig):
        raise ValueError(f"{str(path)!r}: the autoencoder is a VQ model; Stable Diffusion uses a KL autoencoder")  # noqa: TRY004
    text_cfg = from_dict(CLIPTextConfig, json.loads(meta[META_TEXT])) if META_TEXT in meta \
        else clip_config_from_original(text_state, "gelu" if sd2 else "quick_gelu")

    kwargs = {"device": device, "dtype": dtype}
    unet = assign_module(UNet, unet_cfg, unet_keys.from_original(unet_state, unet_cfg), what=f"{path} UNet", **kwargs)
    vae = assign_module(AutoencoderKL, vae_cfg, vae_keys.from_original(vae_state, vae_cfg), what=f"{path} VAE",
                        **kwargs)
    text = assign_module(CLIPTextEncoder, text_cfg, text_state, what=f"{path} text encoder", **kwargs)
    if "schedule" not in settings and not default_schedule_matches(state):
        warnings.warn(f"{path}: its alphas_cumprod buffer is not SD v1's schedule; SD v1's is used "
                      f"(put the model's CompVis YAML beside it as {sidecar_path(path).name!r} to give another)")
    pad_id = int(meta[META_PAD_ID]) if META_PAD_ID in meta else SD2_PAD_ID if sd2 else None
    tokenizer = CLIPTokenizer.from_bpe_file(pad_id=pad_id)
    return StableDiffusionComponents(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, **settings)


def original_state_dict(sd: StableDiffusionComponents, schedule_buffers: bool = True) -> dict[str, torch.Tensor]:
    """``sd``'s weights under CompVis single-file names (tensors shared with the modules, not copied)."""
    state = {UNET_PREFIX + k: v for k, v in unet_keys.to_original(sd.unet.state_dict(), sd.unet.config).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_keys.to_original(sd.vae.state_dict(), sd.vae.config).items()})
    text = sd.text_encoder.state_dict()
    state.update(clip_keys.to_original(text))
    positions = sd.text_encoder.config.max_position_embeddings
    state[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # as CompVis files hold
    if schedule_buffers:  # what CompVis' DDPM registers first; readers ignore them
        alphas_cumprod = make_alphas_cumprod(sd.schedule)
        state["betas"] = make_betas(sd.schedule)
        state["alphas_cumprod"] = alphas_cumprod
        state["alphas_cumprod_prev"] = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    return state


def save_original(sd: StableDiffusionComponents, path: str | Path, schedule_buffers: bool = True) -> Path:
    """Write ``sd`` as one CompVis-layout ``.safetensors`` file, atomically. openldm metadata (configs, sampling
    settings, an SD 2 tokenizer's padding) rides along so that a round trip is lossless; other readers ignore it.
    The text tower is written under SD v1's names whatever its kind: an SD 2 tower no longer has the last OpenCLIP
    block it was read without, so its OpenCLIP layout cannot be rebuilt (its GELU is in the metadata)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{str(path)!r}: original-layout files are written as .safetensors only")
    state = {k: v.detach().contiguous() for k, v in original_state_dict(sd, schedule_buffers).items()}
    meta = {"format": "pt", META_SETTINGS: json.dumps(sd.sampling_settings()),
            META_UNET: json.dumps(to_dict(sd.unet.config)), META_VAE: json.dumps(to_dict(sd.vae.config)),
            META_TEXT: json.dumps(to_dict(sd.text_encoder.config))}
    if sd.tokenizer.pad_id != sd.tokenizer.end_id:
        meta[META_PAD_ID] = str(sd.tokenizer.pad_id)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def default_schedule_matches(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a file's ``alphas_cumprod`` buffer (if any) is SD v1's default schedule."""
    if "alphas_cumprod" not in state:
        return True
    ref = make_alphas_cumprod(ScheduleConfig())
    got = state["alphas_cumprod"]
    return got.shape == ref.shape and torch.allclose(got.float(), ref, rtol=2e-3, atol=1e-5)  # fp16 files
