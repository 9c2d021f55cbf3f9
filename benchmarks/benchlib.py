"""What the benchmark scripts share: the random-weight SD v1.5 checkpoint they all run on (built once, from code, no
download), its prompts, the step-cutter rows of issue 16, the FLOP formula for CPU attention that
``torch.utils.flop_counter`` lacks, and the Markdown table header the scripts print."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from openldm.pipelines.common import StepCutters

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openldm" / "benchmarks" / "sd15-random"


# ---- the random-weight SD v1.5 checkpoint, built once -----------------------------------------------------------

def build_cache(cache: Path) -> Path:
    """``cache/sd15.safetensors`` (original layout, float32, written by our converter from a diffusers folder that
    diffusers itself saved). Built on the first run only."""
    single = cache / "sd15.safetensors"
    if single.is_file():
        return single
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from openldm.io.sd import convert
    from openldm.tokenizers.clip_bpe import CLIPTokenizer

    print(f"building the random-weight SD v1.5 checkpoint in {cache} (once) ...", flush=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    # diffusers' defaults are SD v1's UNet; the VAE and CLIP configs are those of runwayml/stable-diffusion-v1-5
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    tok_dir = cache / "tokenizer-src"
    CLIPTokenizer.from_bpe_file().save_folder(tok_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = cache / "diffusers"
    pipe.save_pretrained(str(folder))
    del pipe, unet, vae, text
    convert(folder, single, to="original")
    print(f"  built in {time.perf_counter() - start:.0f} s: {single} ({single.stat().st_size / 2**30:.2f} GiB)",
          flush=True)
    return single


# ---- the step cutters' rows and FLOP counting ----------------------------------------------------------------

GUIDANCE_INTERVAL = (0.28, 5.42)  # sigmas of the guidance-interval rows (--guidance-interval's default)


CUTTER_ROW = "interval + DeepCache 3 + ToMe 0.5"  # all three together: the row of the whole-image target


def variants(interval: tuple[float, float] = GUIDANCE_INTERVAL) -> list[tuple[str, StepCutters]]:
    """(name, cutters) of every row, plain first, the cutters together (``CUTTER_ROW`` and a faster one) last."""
    lo, hi = interval
    return [
        ("plain", StepCutters()),
        (f"guidance in [{lo:g}, {hi:g}]", StepCutters(guidance_interval=interval)),
        ("DeepCache N=2", StepCutters(deepcache_interval=2)),
        ("DeepCache N=3", StepCutters(deepcache_interval=3)),
        ("DeepCache N=5", StepCutters(deepcache_interval=5)),
        ("ToMe 0.5 (top level)", StepCutters(token_merging_ratio=0.5)),
        ("ToMe 0.5 (levels <= 2)", StepCutters(token_merging_ratio=0.5, token_merging_max_downsample=2)),
        (CUTTER_ROW, StepCutters(guidance_interval=interval, deepcache_interval=3, token_merging_ratio=0.5)),
        ("interval + DeepCache 5 + ToMe 0.5", StepCutters(guidance_interval=interval, deepcache_interval=5,
                                                          token_merging_ratio=0.5)),
    ]


def _sdpa_flops(query, key, value, *args, **kwargs) -> int:
    """Two matmuls of (B, heads, T, d) x (B, heads, S, d): CPU attention, which flop_counter does not count itself."""
    B, heads, T, d = query
    return 4 * B * heads * T * key[2] * d


FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def markdown_header(header: str) -> str:
    """``header`` (a Markdown row, "| a | b |") after a blank line, and its separator row of matching widths."""
    return "\n" + header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"
