"""diffusers-format Stable Diffusion v1-family and 2.x folders: read and write.

A folder holds ``model_index.json`` and one subfolder per component: ``unet/`` and ``vae/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``), ``text_encoder/`` (transformers ``config.json`` + ``model.safetensors``),
``tokenizer/`` (``vocab.json`` + ``merges.txt``) and ``scheduler/scheduler_config.json``. Each component's config
is read, so SD v1-family models of other sizes load. Weights: ``.safetensors`` first, then the ``fp16`` variant,
then pickled ``.bin`` files (``torch.load(weights_only=True)``; full unpickling only with ``unsafe_load``).

SD 2.x folders need nothing else: their configs say it all (UNet ``use_linear_projection``, ``attention_head_dim``
per block = heads of width 64, ``cross_attention_dim`` 1024; the 23-layer GELU text encoder; the tokenizer's "!"
padding; the scheduler's ``prediction_type``, epsilon or v_prediction), and the folders we write keep it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from openldm.io.components import (
    StableDiffusionComponents,
    assign_module,
    atomic_folder,
    read_tensors,
    scheduler_config_to_diffusers,
    scheduler_settings_from_diffusers,
)
from openldm.io.keymaps import autoencoder as vae_keys
from openldm.io.keymaps import clip as clip_keys
from openldm.io.keymaps import unet as unet_keys
from openldm.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from openldm.models.text_encoder import CLIPTextEncoder
from openldm.models.unet import UNet
from openldm.tokenizers.clip_bpe import CLIPTokenizer

DIFFUSERS_VERSION = "0.27.0"  # written into configs; any recent diffusers reads these folders
_WEIGHT_NAMES = {  # in order of preference
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                  "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "transformers": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
PIPELINE = "StableDiffusionPipeline"
INPAINT_PIPELINE = "StableDiffusionInpaintPipeline"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a diffusers Stable Diffusion folder needs it")
    return json.loads(path.read_text(encoding="utf-8"))


def component_weights(folder: Path, library: str, unsafe_load: bool) -> dict[str, torch.Tensor]:
    """The (memory-mapped) state dict of one component folder; sharded checkpoints (``*.index.json``) too."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: a diffusers Stable Diffusion folder needs it")
    for name in _WEIGHT_NAMES[library]:
        index = folder / f"{name}.index.json"
        if index.is_file():  # sharded: a weight map from key to shard file
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_tensors(folder / shard, unsafe_load=unsafe_load)[0])
            return state
        if (folder / name).is_file():
            return read_tensors(folder / name, unsafe_load=unsafe_load)[0]
    raise FileNotFoundError(f"{folder} has no weights file; looked for {', '.join(_WEIGHT_NAMES[library])}")


def load_diffusers(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   unsafe_load: bool = False) -> StableDiffusionComponents:
    """Load a diffusers-format SD v1-family or SD 2.x folder."""
    folder = Path(path)
    index = _read_json(folder / "model_index.json")
    if "text_encoder_2" in index or "prior" in index or "transformer" in index:
        raise ValueError(f"{folder}: {index.get('_class_name')} is not an SD v1-family pipeline (one CLIP text "
                         "encoder and a UNet2DConditionModel); it is not supported")
    kwargs = {"device": device, "dtype": dtype}

    unet_cfg = unet_keys.unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    unet_state = unet_keys.from_diffusers(component_weights(folder / "unet", "diffusers", unsafe_load), unet_cfg)
    unet = assign_module(UNet, unet_cfg, unet_state, what=f"{folder / 'unet'}", **kwargs)

    vae_cfg = vae_keys.autoencoder_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    if not isinstance(vae_cfg, AutoencoderKLConfig):
        raise ValueError(f"{folder / 'vae'}: a VQ autoencoder; Stable Diffusion pipelines use AutoencoderKL")  # noqa: TRY004
    vae_state = vae_keys.from_diffusers(component_weights(folder / "vae", "diffusers", unsafe_load), vae_cfg)
    vae = assign_module(AutoencoderKL, vae_cfg, vae_state, what=f"{folder / 'vae'}", **kwargs)

    text_cfg = clip_keys.clip_config_from_diffusers(_read_json(folder / "text_encoder" / "config.json"))
    text_state = clip_keys.from_diffusers(component_weights(folder / "text_encoder", "transformers", unsafe_load))
    text = assign_module(CLIPTextEncoder, text_cfg, text_state, what=f"{folder / 'text_encoder'}", **kwargs)

    tokenizer = load_tokenizer(folder / "tokenizer")
    settings = scheduler_settings_from_diffusers(_read_json(folder / "scheduler" / "scheduler_config.json"))
    return StableDiffusionComponents(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, **settings)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer folder: ``vocab.json`` + ``merges.txt`` (every published SD folder), or only the fast
    tokenizer's ``tokenizer.json`` (what transformers 5's ``save_pretrained`` writes)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: a diffusers Stable Diffusion folder needs it")
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_folder(folder)
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{folder / 'tokenizer.json'}: model type {model.get('type')!r}; a CLIP tokenizer is BPE")
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    kwargs = {}
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if isinstance(pad, str) and pad in model["vocab"]:
        kwargs["pad_id"] = model["vocab"][pad]
    if isinstance(config.get("model_max_length"), int) and 3 <= config["model_max_length"] <= 4096:
        kwargs["max_length"] = config["model_max_length"]
    return CLIPTokenizer(model["vocab"], merges, **kwargs)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is required by transformers' safetensors loader.
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def save_diffusers(sd: StableDiffusionComponents, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``sd`` as a folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` (or the inpainting
    pipeline's, for a 9-channel UNet) loads, atomically."""
    pipeline = INPAINT_PIPELINE if sd.is_inpainting else PIPELINE
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    with atomic_folder(path, overwrite) as tmp:
        _write_json(tmp / "model_index.json", {
            "_class_name": pipeline, **version, "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]})
        unet_cfg = {"_class_name": "UNet2DConditionModel", **version,
                    **unet_keys.unet_config_to_diffusers(sd.unet.config)}
        _write_json(tmp / "unet" / "config.json", unet_cfg)
        _write_weights(tmp / "unet" / _WEIGHT_NAMES["diffusers"][0],
                       unet_keys.to_diffusers(sd.unet.state_dict(), sd.unet.config))
        vae_cfg = {"_class_name": "AutoencoderKL", **version, **vae_keys.autoencoder_config_to_diffusers(sd.vae.config)}
        _write_json(tmp / "vae" / "config.json", vae_cfg)
        _write_weights(tmp / "vae" / _WEIGHT_NAMES["diffusers"][0],
                       vae_keys.to_diffusers(sd.vae.state_dict(), sd.vae.config))
        _write_json(tmp / "text_encoder" / "config.json", clip_keys.clip_config_to_diffusers(sd.text_encoder.config))
        _write_weights(tmp / "text_encoder" / _WEIGHT_NAMES["transformers"][0],
                       clip_keys.to_diffusers(sd.text_encoder.state_dict()))
        sd.tokenizer.save_folder(tmp / "tokenizer")
        _write_json(tmp / "scheduler" / "scheduler_config.json", {**scheduler_config_to_diffusers(sd), **version})
    return Path(path)
