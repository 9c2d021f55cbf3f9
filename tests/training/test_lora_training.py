"""LoRA training (openldm/training/lora.py and the lora section of the diffusion loop): adapters on a frozen UNet,
the kohya file diffusers loads, resume, bf16, and the errors of a bad lora section."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from openldm.cli import main
from openldm.config import ConfigError, LoRAConfig, from_dict, to_dict
from openldm.diffusion.schedules import make_alphas_cumprod, q_sample
from openldm.io.native import load_model
from openldm.models.unet import UNet, UNetConfig
from openldm.pipelines.trained import load_run, sample_trained
from openldm.training import diffusion
from openldm.training.diffusion import DiffusionTrainConfig, train_diffusion
from openldm.training.ema import EMA
from openldm.training.lora import inject_lora, load_lora_state_dict, lora_layers, lora_state_dict
from tests.training.test_diffusion_training import tiny
from tests.training.test_sd_finetune import config as sd_config
from tests.training.test_sd_finetune import tiny_sd  # noqa: F401  (a module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny class-conditional pixel-space run trained here (30 steps on shapes on black and gray)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("base") / "run"
    data = {"name": "shapes", "options": {"size": 16, "num_samples": 64, "backgrounds": ["black", "gray"]}}
    train_diffusion(tiny(run, steps=30, save_every=30, log_every=10, optim={"lr": 2e-3}, data=data), progress=False)
    torch.set_num_threads(threads)
    return run


def lora_config(base, out_dir, **over) -> dict:
    """The base run's config as a LoRA run on it: the base's conditions and schedule, new images (8 shapes on
    white, which the base never saw), adapters of rank 4 with alpha 2."""
    data = to_dict(tiny(out_dir))
    for key in ("unet", "unet_preset"):
        data.pop(key)
    data.update(base_model=str(base), lora={"rank": 4, "alpha": 2.0},
                data={"name": "shapes", "options": {"size": 16, "num_samples": 8, "num_objects": 1, "seed": 7,
                                                    "backgrounds": ["white"]}},
                steps=40, save_every=40, log_every=1, ema_decay=0.9, optim={"lr": 1e-2})
    data.update(over)
    return data


def record_unets(monkeypatch) -> list[nn.Module]:
    """The UNets the loop injects adapters into and the conditioners it builds (in that list's ``conditioners``
    attribute), as it trains them."""
    seen = type("Seen", (list,), {})()
    seen.conditioners = []
    inject, build = diffusion.inject_lora, diffusion.build_conditioning
    monkeypatch.setattr(diffusion, "inject_lora", lambda unet, cfg: seen.append(unet) or inject(unet, cfg))
    monkeypatch.setattr(diffusion, "build_conditioning",
                        lambda *a, **k: seen.conditioners.append(build(*a, **k)) or seen.conditioners[-1])
    return seen


def assert_base_unchanged(seen, run) -> None:
    """The trained UNet's base tensors and the conditioner equal the base run's EMA weights, bit for bit."""
    base = {k: v.float() for k, v in load_model(run / "unet_ema.safetensors").state_dict().items()}
    trained = {k: v for k, v in seen[0].state_dict().items() if not k.endswith(SUFFIXES)}
    assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in base)
    cond = {k[4:]: v.float() for k, v in load_file(str(run / "conditioner.safetensors")).items() if k.startswith("ema.")}
    (conditioner,) = seen.conditioners
    state = conditioner.state_dict()
    assert state.keys() == cond.keys() and all(torch.equal(state[k], cond[k]) for k in cond)
    assert not any(p.requires_grad for p in conditioner.parameters())


@torch.no_grad()
def fixed_noise_error(unet: nn.Module, conditioner, batch: dict, cfg: DiffusionTrainConfig) -> float:
    """The eps-prediction error on ``batch``'s images at fixed noise and timesteps (seed 0), every condition given."""
    x0 = batch["image"].float()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(50, 600, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = q_sample(x0, t, make_alphas_cumprod(cfg.schedule), noise)
    slots = conditioner.eval()(batch, latent_size=tuple(x0.shape[-2:]))
    return float(F.mse_loss(unet.eval()(x_t, t, **slots.as_kwargs()), noise))


# ---- the adapters, by closed-form maths ----------------------------------------------------------------------

def test_an_adapter_adds_scale_up_down_beside_the_frozen_layer():
    """At injection the UNet's output is unchanged (up = 0); with random adapters each layer computes
    ``W x + alpha / rank * up @ down x`` (a Conv2d: the conv with the merged kernel); only adapters train."""
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=2, out_channels=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), num_heads=2, context_dim=8, norm_groups=4)
    unet = UNet(cfg)
    for p in unet.parameters():  # no zero-initialised layers: every branch reaches the output
        nn.init.normal_(p, std=0.2)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, ctx = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 8)
    ref = unet(x, t, context=ctx)
    names = inject_lora(unet, LoRAConfig(rank=3, alpha=1.5, targets=["*_attn.to_q", "*_attn.to_out", "*.ff.proj",
                                                                     "down.0.0.conv1"]))
    assert "down.0.0.conv1" in names and "mid.1.blocks.0.cross_attn.to_q" in names and len(names) == 4 * 5 + 1  # 4 transformers (down, mid, 2 up) x 5 layers, one conv
    torch.testing.assert_close(unet(x, t, context=ctx), ref, rtol=0, atol=0)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {f"{m}.{s}" for m in names
                                                                            for s in ("lora_down.weight", "lora_up.weight")}
    for layer in lora_layers(unet).values():
        nn.init.normal_(layer.lora_up.weight, std=0.3)
    state = lora_state_dict(unet)
    assert set(state) == {m + s for m in names for s in SUFFIXES} and float(state[names[0] + ".alpha"]) == 1.5
    for layer in lora_layers(unet).values():
        delta = 0.5 * (layer.lora_up.weight.flatten(1) @ layer.lora_down.weight.flatten(1)).reshape(layer.weight.shape)
        if isinstance(layer, nn.Linear):
            h = torch.randn(2, 7, layer.in_features)
            want = F.linear(h, layer.weight + delta, layer.bias)
        else:
            h = torch.randn(2, layer.in_channels, 6, 6)
            want = F.conv2d(h, layer.weight + delta, layer.bias, padding=1)
        torch.testing.assert_close(layer(h), want, rtol=1e-5, atol=1e-5)
    assert (unet(x, t, context=ctx) - ref).abs().max() > 1e-2
    after = {k: v for k, v in unet.state_dict().items() if not k.endswith(SUFFIXES)}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_adapter_dropout_drops_the_branch_input_in_training_only():
    """dropout=0.5: in training mode the branch sees a dropped (and rescaled) input, so two calls differ and the
    mean over many calls is the eval output; in eval mode the layer is the closed form."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=2, out_channels=2, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                           attention_levels=(0,), num_heads=2, context_dim=None, norm_groups=4))
    (name,) = inject_lora(unet, LoRAConfig(rank=2, dropout=0.5, targets=["down.0.1.blocks.0.ff.out"]))
    layer = lora_layers(unet)[name]
    nn.init.normal_(layer.lora_up.weight)
    h = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        want = F.linear(h, layer.weight + layer.lora_up.weight @ layer.lora_down.weight, layer.bias)
        torch.testing.assert_close(layer.eval()(h), want, rtol=1e-5, atol=1e-5)
        layer.train()
        a, b = layer(h), layer(h)
        assert (a - b).abs().max() > 1e-3
        mean = torch.stack([layer(h) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, want, rtol=0, atol=0.15)


def test_the_ema_of_a_lora_model_averages_the_adapters_and_shares_the_frozen_base():
    """EMA(share_frozen=True): the shadow holds the model's own frozen tensors (no copy) and its own adapters, which
    the update averages; the shadow's forward runs its adapters (its hooks are its own layers')."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=2, out_channels=2, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                           attention_levels=(0,), num_heads=2, context_dim=None, norm_groups=4))
    for p in unet.parameters():
        nn.init.normal_(p, std=0.2)
    inject_lora(unet, LoRAConfig(rank=2))
    ema = EMA(unet, decay=0.5, warmup=False, share_frozen=True)
    shadow = dict(ema.shadow.named_parameters())
    for name, p in unet.named_parameters():
        assert (shadow[name] is p) != p.requires_grad, name
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            layer.lora_up.weight.fill_(0.1)
    ema.update(unet)
    assert all(torch.equal(l.lora_up.weight, torch.full_like(l.lora_up.weight, 0.05))
               for l in lora_layers(ema.shadow).values())
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([5, 500])
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            layer.lora_up.weight.fill_(0.05)
        want = unet.eval()(x, t)  # the model with the shadow's adapter values ...
        for layer in lora_layers(unet).values():
            layer.lora_up.weight.fill_(0.3)  # ... which the model then leaves
        torch.testing.assert_close(ema.shadow(x, t), want, rtol=0, atol=0)
        assert (unet(x, t) - want).abs().max() > 1e-3


# ---- a run trained here --------------------------------------------------------------------------------------

def test_openldm_train_with_a_lora_section_learns_new_images_and_trains_only_adapters(base_run, tmp_path,
                                                                                     monkeypatch):
    """``openldm train`` on a run trained here: the loss falls; the fixed-noise error on the new images falls with
    the trained adapters; every base tensor (UNet and conditioner) is bit-identical after training; the run
    saves only adapters. The targets add the ResBlock and in/out convs (LoCon) to the default linears: the tiny
    base's transformers barely moved from their zero-initialised proj_out in 30 steps, so adapters before it have
    little to act through. Measured: logged loss mean of the first 5 steps 0.289, of the last 5 0.183;
    fixed-noise error 0.302 (base) -> 0.154 (EMA adapters); seeded samples' MSE to the nearest new image 1.98 ->
    1.68, their 2x2 corners' mean -0.005 -> 0.199 (the images' white: 1)."""
    seen = record_unets(monkeypatch)
    path = tmp_path / "lora.yaml"
    lora = {"rank": 4, "alpha": 2.0, "targets": [*LoRAConfig().targets, "*.conv1", "*.conv2", "conv_in", "conv_out"]}
    path.write_text(yaml.safe_dump(lora_config(base_run, tmp_path / "run", lora=lora, sample_every=40, sample_steps=4)))
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    (unet,) = seen
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.75 * first, (first, last)

    assert_base_unchanged(seen, base_run)
    assert all(layer.lora_up.weight.abs().max() > 0 for layer in lora_layers(unet).values())

    names = sorted(lora_layers(unet))
    # 6 linears of each of the 4 transformers (down, mid, 2 up; no cross-attention), 2 convs of each of the 8
    # ResBlocks, conv_in, conv_out
    assert len(names) == 4 * 6 + 8 * 2 + 2
    kohya = load_file(str(tmp_path / "run" / "lora.safetensors"))
    assert len(kohya) == 3 * len(names) and all(k.startswith("lora_unet_") and k.endswith(SUFFIXES) for k in kohya)
    weights = load_file(str(tmp_path / "run" / "lora_weights.safetensors"))
    assert set(weights) == {p + m + s for p in ("", "ema.") for m in names for s in SUFFIXES}
    assert not (tmp_path / "run" / "unet.safetensors").exists()
    assert (tmp_path / "run" / "samples" / "step_000040.png").is_file()  # the grid of the EMA adapters
    with pytest.raises(ValueError, match="is a LoRA run: .*--lora"):
        load_run(tmp_path / "run")

    model = load_run(base_run)  # the base run's EMA UNet and conditioner, as the LoRA run started from
    cfg = from_dict(DiffusionTrainConfig, lora_config(base_run, tmp_path / "run", lora=lora))
    from openldm.data import build_dataset

    data = build_dataset(cfg.data.name, cfg.data.options)
    batch = torch.utils.data.default_collate([data[i] for i in range(8)])
    before = fixed_noise_error(model.unet, model.conditioner, batch, cfg)
    samples_before = sample_trained(model, class_label=[0, 1, 2, 3], steps=10, seed=0)
    inject_lora(model.unet, cfg.lora)
    load_lora_state_dict(model.unet, {k[4:]: v for k, v in weights.items() if k.startswith("ema.")})
    after = fixed_noise_error(model.unet, model.conditioner, batch, cfg)
    assert after < 0.7 * before, (before, after)
    # the samples (same seed) move toward the new images: closer to the nearest one, corners toward their white
    samples = sample_trained(model, class_label=[0, 1, 2, 3], steps=10, seed=0)
    images = batch["image"].float()

    def nearest(x):  # mean over samples of the MSE to the nearest training image
        return float(((x[:, None] - images[None]) ** 2).mean((2, 3, 4)).min(1).values.mean())

    def corners(x):  # mean of the four 2x2 corners, where the new images are white (1)
        ends = (slice(0, 2), slice(-2, None))
        return float(torch.stack([x[..., rows, cols] for rows in ends for cols in ends]).mean())

    assert nearest(samples) < 0.92 * nearest(samples_before), (nearest(samples_before), nearest(samples))
    assert corners(samples) > corners(samples_before) + 0.1, (corners(samples_before), corners(samples))


def test_a_lora_on_the_bundled_latent_model_uses_its_autoencoder_scale_and_conditioner(tmp_path, monkeypatch):
    """The bundled Fashion-MNIST run (latent space, float16 files, class + MiniLM text conditions) as the base: its
    EMA UNet and conditioner are loaded (as float32) and stay bit-identical, its autoencoder encodes the new images
    with its latent scale (the UNet file's)."""
    from PIL import Image

    from openldm.bundled import bundled_dir
    from openldm.io.run_dir import read_config, read_scaling_factor

    root = tmp_path / "images"
    for label, name in enumerate(("box", "bar")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.zeros((32, 32), np.uint8)
            pixels[8 + i: 20 + i, 6 + 4 * label: 26] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            (root / name / f"{i}.txt").write_text(f"a white {name}")
    base = bundled_dir()
    data = to_dict(read_config(base))
    for key in ("unet", "unet_preset", "autoencoder"):
        data.pop(key)
    data.update(base_model=str(base), lora={"rank": 4}, steps=4, batch_size=8, log_every=1, save_every=4,
                sample_every=0, snapshot_every=0, out_dir=str(tmp_path / "run"),
                data={"name": "image_folder", "options": {"root": str(root), "size": 32, "channels": 1,
                                                          "labels_from_folders": True}})
    seen, scales = record_unets(monkeypatch), []  # scales: the loop's TrainingData
    real = diffusion.prepare_data
    monkeypatch.setattr(diffusion, "prepare_data", lambda *a, **k: scales.append(real(*a, **k)) or scales[-1])
    out = train_diffusion(from_dict(DiffusionTrainConfig, data), progress=False)
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    assert [d.scale for d in scales] == [pytest.approx(read_scaling_factor(base / "unet_ema.safetensors"))]
    assert_base_unchanged(seen, base)
    assert len(load_file(str(tmp_path / "run" / "lora.safetensors"))) == 3 * len(lora_layers(seen[0]))


def test_lora_resume_ends_bit_identical_to_an_uninterrupted_run(base_run, tmp_path):
    """6 steps at once, or 3 then a resume to 6: the same losses and the same raw and EMA adapters, bit for bit."""
    def cfg(out, steps, **over):
        return from_dict(DiffusionTrainConfig, lora_config(base_run, out, steps=steps, save_every=3, **over))

    full = train_diffusion(cfg(tmp_path / "full", 6, snapshot_every=3), progress=False)["history"]
    part = train_diffusion(cfg(tmp_path / "split", 3), progress=False)["history"]
    rest = train_diffusion(cfg(tmp_path / "split", 6), resume=True, progress=False)["history"]
    assert [h["loss"] for h in part + rest] == [h["loss"] for h in full]
    for name in ("lora_weights.safetensors", "lora.safetensors"):
        a, b = (load_file(str(tmp_path / run / name)) for run in ("full", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    snapshot = tmp_path / "full" / "snapshots" / "step_000003"
    assert [p.name for p in snapshot.iterdir()] == ["lora.safetensors"]  # the EMA adapters of step 3
    up = next(k for k in a if k.endswith(".lora_up.weight"))  # (a: the last step's lora.safetensors)
    assert not torch.equal(load_file(str(snapshot / "lora.safetensors"))[up], a[up])
    with pytest.raises(ValueError, match="lora.rank: 4 -> 8"):
        train_diffusion(from_dict(DiffusionTrainConfig, lora_config(base_run, tmp_path / "split", steps=6,
                                                                    save_every=3, lora={"rank": 8, "alpha": 2.0})),
                        resume=True, progress=False)


def test_lora_trains_under_bf16_autocast(base_run, tmp_path, monkeypatch):
    """precision bf16 (CPU autocast here): the adapters stay float32 and train, the losses are finite."""
    seen = record_unets(monkeypatch)
    out = train_diffusion(from_dict(DiffusionTrainConfig, lora_config(base_run, tmp_path / "run", steps=4,
                                                                      precision="bf16")), progress=False)
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    layers = lora_layers(seen[0]).values()
    assert all(l.lora_up.weight.dtype == torch.float32 and l.lora_up.weight.abs().max() > 0 for l in layers)


def test_a_bad_lora_section_is_named(base_run, tmp_path, capsys):
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(lora_config(base_run, tmp_path / "cli")))
    assert main(["train", "--config", str(path), "--quiet", "lora.targets=['*.to_qq']"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openldm train: error: lora.targets pattern '*.to_qq' matches no") and "\n" not in err
    with pytest.raises(ConfigError, match="lora.rank=0"):
        from_dict(DiffusionTrainConfig, lora_config(base_run, tmp_path / "a", lora={"rank": 0}))
    with pytest.raises(ConfigError, match="set base_model"):
        from_dict(DiffusionTrainConfig, {"lora": {"rank": 4}})
    with pytest.raises(ConfigError, match="unknown config key 'lora.ranks'"):
        from_dict(DiffusionTrainConfig, lora_config(base_run, tmp_path / "b", lora={"ranks": 4}))
    with pytest.raises(ValueError, match="'\\*.nothing' matches no Linear or Conv2d layer"):
        train_diffusion(from_dict(DiffusionTrainConfig, lora_config(base_run, tmp_path / "c",
                                                                    lora={"targets": ["*.nothing"]})), progress=False)
    with pytest.raises(ValueError, match="proj_in/proj_out"):
        train_diffusion(from_dict(DiffusionTrainConfig, lora_config(base_run, tmp_path / "d",
                                                                    lora={"targets": ["*.proj_in"]})), progress=False)
    with pytest.raises(ValueError, match="conditions .*copy them from the base run's config.yaml"):
        train_diffusion(from_dict(DiffusionTrainConfig, lora_config(base_run, tmp_path / "e", conditions=[])),
                        progress=False)
    no_lora = lora_config(base_run, tmp_path / "f")
    no_lora.pop("lora")
    with pytest.raises(ValueError, match="is a run directory: train LoRA adapters on it"):
        train_diffusion(from_dict(DiffusionTrainConfig, no_lora), progress=False)


# ---- a Stable Diffusion base model: the kohya file in diffusers -------------------------------------------------

def test_an_sd_lora_in_the_kohya_layout_loads_in_diffusers_with_the_same_unet_output(tiny_sd, tmp_path):  # noqa: F811
    """A LoRA trained a few steps on the tiny SD v1 (attention and feed-forward linears plus a ResBlock conv,
    alpha != rank) and saved in the kohya layout: diffusers' ``load_lora_weights`` + its UNet gives what our UNet
    with the (EMA) adapters gives. Measured (one thread): max abs diff 0 for an output of max 1.79, which the LoRA
    moves by 0.293."""
    from diffusers import StableDiffusionPipeline

    from openldm.io.sd import load_sd

    lora = {"rank": 4, "alpha": 2.0, "targets": [*LoRAConfig().targets, "*.conv1"]}
    cfg = sd_config(tiny_sd, tmp_path / "run", lora=lora, steps=4, ema_decay=0.5, optim={"lr": 2e-2})
    train_diffusion(cfg, progress=False)
    weights = load_file(str(tmp_path / "run" / "lora_weights.safetensors"))

    folder = tiny_sd[0]
    sd = load_sd(folder)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        pipe.load_lora_weights(str(tmp_path / "run"), weight_name="lora.safetensors")
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        inject_lora(sd.unet, cfg.lora)
        load_lora_state_dict(sd.unet, {k[4:]: v for k, v in weights.items() if k.startswith("ema.")})
        ours = sd.unet(x, t, context=ctx)
    err, size, moved = (ours - theirs).abs().max(), theirs.abs().max(), (theirs - plain).abs().max()
    print(f"LoRA parity: max abs diff {float(err):.3g}, output max {float(size):.3g}, LoRA moves it by {float(moved):.3g}")
    assert err <= 1e-4 * size, (err, size)
    assert moved > 1000 * err, (moved, err)  # the adapters matter: a wrong layout or scale would show
