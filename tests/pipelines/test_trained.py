"""Sampling from run directories written by train_diffusion: loading, conditions, guidance, seeds, pixel and
latent space, inpainting, and (slow) that a class-conditional model draws the colour it is asked for."""
import shutil
import time

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from openldm.conditioning.compose import build_conditioning
from openldm.config import from_dict, to_dict
from openldm.data.shapes import COLORS, dominant_color
from openldm.diffusion.denoiser import DiscreteDenoiser
from openldm.diffusion.schedules import make_alphas_cumprod
from openldm.diffusion.spacing import make_plan
from openldm.evaluation.grid import tile
from openldm.io.native import save_model
from openldm.models.autoencoder import AutoencoderKL, tiny_autoencoder_kl
from openldm.models.contrastive import SmallCLIP, tiny_contrastive_config
from openldm.models.unet import UNet
from openldm.pipelines.trained import condition, load_run, sample_trained
from openldm.samplers.ddim import sample_ddim
from openldm.training.diffusion import (
    DiffusionTrainConfig,
    build_unet_config,
    train_diffusion,
)

SIZE = 16
SCHEDULE = {"kind": "linear", "beta_start": 0.0001, "beta_end": 0.02}


def config(out_dir, **over) -> DiffusionTrainConfig:
    data = {
        "data": {"name": "shapes", "options": {"size": SIZE, "num_samples": 64, "num_objects": 1}},
        "unet_preset": "tiny-unet",
        "unet": {"model_channels": 16, "norm_groups": 4},
        "conditions": [{"kind": "class_label", "options": {"num_classes": 6, "dim": 16}, "drop_prob": 0.2}],
        "schedule": SCHEDULE,
        "batch_size": 8, "steps": 3, "log_every": 100, "save_every": 1000, "out_dir": str(out_dir),
        "optim": {"lr": 1e-3}, "ema_decay": 0.5,
    }
    data.update(over)
    return from_dict(DiffusionTrainConfig, data)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """A class-conditional (label = colour) pixel-space run, trained a few steps: plumbing, not quality."""
    out = tmp_path_factory.mktemp("class_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_diffusion(config(out), progress=False)
    torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def model(class_run):
    return load_run(class_run)


# ------------------------------------------------------------------------------------------------- loading

def test_load_run_rebuilds_a_pixel_model_from_the_directory(class_run, model):
    assert model.autoencoder is None and model.downsampling_factor == 1 and model.scaling_factor == 1.0
    assert model.data_shape == (3, SIZE, SIZE) and model.image_size == (SIZE, SIZE)
    assert model.class_names == list(COLORS)
    assert model.prediction == "eps" and model.schedule.kind == "linear"
    assert not model.conditioner.training and not model.unet.training
    state = load_file(str(class_run / "conditioner.safetensors"))
    emb = model.conditioner.conditioners["class_label"].embedding.weight
    assert torch.equal(emb, state["ema.conditioners.class_label.embedding.weight"])
    raw = load_run(class_run, ema=False)
    assert torch.equal(raw.conditioner.conditioners["class_label"].embedding.weight,
                       state["conditioners.class_label.embedding.weight"])
    assert not torch.equal(next(raw.unet.parameters()), next(model.unet.parameters()))  # EMA differs from raw


def test_load_run_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_run(tmp_path)


# ------------------------------------------------------------------------------------------------ sampling

def test_pixel_space_samples_without_an_autoencoder(model):
    x = sample_trained(model, class_label=2, num_images=3, steps=4, seed=1)
    assert x.shape == (3, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    assert tile(x).size == (2 * SIZE + 3 * 2, 2 * SIZE + 3 * 2)  # 2 x 2 cells (one empty), 2 px padding


def test_a_seed_reproduces_the_samples(model):
    kw = dict(class_label=[0, 3], num_images=2, steps=5, guidance_scale=2.0)
    a, b = sample_trained(model, seed=7, **kw), sample_trained(model, seed=7, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, sample_trained(model, seed=8, **kw))
    for s in ("euler_ancestral", "dpmpp_2m"):  # stochastic and multistep samplers too
        assert torch.equal(sample_trained(model, sampler=s, seed=3, **kw), sample_trained(model, sampler=s, seed=3, **kw))


def test_labels_are_label_major_and_names_are_accepted(model):
    x = sample_trained(model, class_label=[1, 4], num_images=2, steps=3, seed=0)
    one = sample_trained(model, class_label=4, num_images=2, steps=3, seed=0)
    assert x.shape[0] == 4
    named = sample_trained(model, class_label=["green", "magenta"], num_images=2, steps=3, seed=0)
    assert torch.equal(x, named)
    # the starting noise depends on the seed only: rows 2-3 of the batch of 4 are not the batch of 2
    assert not torch.allclose(x[2:], one)


def count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    return calls, handle


def test_guidance_scale_one_is_the_plain_conditional_denoiser(model):
    steps, B = 6, 2
    calls, handle = count_calls(model.unet)
    try:
        got = sample_trained(model, class_label=5, num_images=B, steps=steps, guidance_scale=1.0, seed=4)
        assert calls == [B] * steps  # one conditional pass per step, no unconditional one
        calls.clear()
        sample_trained(model, class_label=5, num_images=B, steps=steps, guidance_scale=3.0, seed=4)
        assert calls == [2 * B] * steps  # conditional and unconditional batched in one call
    finally:
        handle.remove()
    # the same by hand: D(x, sigma, cond) of the UNet, DDIM over the trailing plan, seed's noise first
    plan = make_plan("ddim", model.schedule, steps, spacing="trailing", steps_offset=0)
    denoiser = DiscreteDenoiser(model.unet, make_alphas_cumprod(model.schedule), "eps", quantize=True)
    noise = torch.randn((B, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(4))
    cond = model.conditioner({"label": torch.tensor([5, 5])}, latent_size=(SIZE, SIZE))
    x = sample_ddim(denoiser, plan.initial_sample(noise), plan.sigmas, cond=cond, **plan.options)
    torch.testing.assert_close(got, x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_no_condition_samples_unconditionally_with_the_null_condition(model):
    calls, handle = count_calls(model.unet)
    try:
        x = sample_trained(model, num_images=2, steps=3, guidance_scale=5.0, seed=0)
    finally:
        handle.remove()
    assert calls == [2] * 3  # nothing to guide towards: one pass
    null = model.conditioner.null(2, latent_size=(SIZE, SIZE))
    label = condition(model.conditioner, {"label": torch.tensor([6, 6])}, {"class_label"}, 2, (SIZE, SIZE), None)
    assert torch.equal(null.vector, label.vector)  # the null class row
    assert x.shape == (2, 3, SIZE, SIZE)


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="out of range"):
        sample_trained(model, class_label=6, steps=2)
    with pytest.raises(ValueError, match="'purple' is not a class name"):
        sample_trained(model, class_label="purple", steps=2)
    with pytest.raises(ValueError, match="prompt was given but the model has no condition.*class_label"):
        sample_trained(model, prompt="a red circle", steps=2)
    with pytest.raises(ValueError, match="no segmentation condition"):
        sample_trained(model, mask=torch.zeros(SIZE, SIZE, dtype=torch.long), steps=2)
    with pytest.raises(ValueError, match="strength=0.5 needs an init_image"):
        sample_trained(model, class_label=0, strength=0.5, steps=2)
    with pytest.raises(ValueError, match="multiples of 1|positive"):
        sample_trained(model, height=0, width=16, steps=2)


def test_inpainting_by_blending_keeps_the_known_pixels(model, tmp_path):
    init = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    fill = torch.zeros(SIZE, SIZE)
    fill[4:12, 4:12] = 1
    Image.fromarray((fill.numpy() * 255).astype("uint8")).save(tmp_path / "mask.png")
    x = sample_trained(model, class_label=1, init_image=init, mask=tmp_path / "mask.png", num_images=2, steps=4)
    keep = fill == 0
    assert torch.allclose(x[:, :, keep], init.expand(2, -1, -1, -1)[:, :, keep], atol=1e-6)
    assert not torch.allclose(x[:, :, ~keep], init.expand(2, -1, -1, -1)[:, :, ~keep], atol=0.1)
    # image-to-image: a low strength stays nearer the image than a full redraw
    near = sample_trained(model, class_label=1, init_image=init, strength=0.2, steps=10)
    far = sample_trained(model, class_label=1, init_image=init, strength=1.0, steps=10)
    assert (near - init).abs().mean() < (far - init).abs().mean()


# ------------------------------------------------------------------------------------- other conditions

def write_untrained_run(out, cfg: DiffusionTrainConfig) -> None:
    """A run directory as train_diffusion writes it, with untrained weights (for conditions the shapes dataset
    cannot feed to training, such as low-res images)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(0)
    conditioner = build_conditioning(cfg.conditions)
    unet = UNet(build_unet_config(cfg, 3, conditioner))
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        save_model(unet, out / name, {"openldm.scaling_factor": "1.0"})
    state = {k: v.contiguous() for k, v in conditioner.state_dict().items()}
    save_file({**state, **{f"ema.{k}": v.clone() for k, v in state.items()}}, str(out / "conditioner.safetensors"))


def test_text_segmentation_low_res_and_inpaint_conditions(tmp_path):
    cfg = config(tmp_path / "multi", conditions=[
        {"kind": "text", "options": {"backend": "transformer", "max_length": 16,
                                     "transformer": {"width": 16, "depth": 1, "heads": 2}}},
        {"kind": "segmentation", "options": {"num_classes": 4, "channels": 2}},
        {"kind": "low_res", "options": {"embed_dim": 8}},
        {"kind": "inpaint", "options": {"latent_channels": 3}},
    ])
    write_untrained_run(tmp_path / "multi", cfg)
    model = load_run(tmp_path / "multi")
    seg = torch.zeros(SIZE, SIZE, dtype=torch.long)
    seg[4:12, 4:12] = 2
    low = Image.new("RGB", (8, 8), (255, 0, 0))
    kw = dict(num_images=2, steps=3, guidance_scale=2.0, seed=0)
    a = sample_trained(model, prompt="a red circle", mask=seg, low_res=low, **kw)
    assert a.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(a, sample_trained(model, prompt="a red circle", mask=seg, low_res=low, **kw))
    seen = []
    handle = model.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        sample_trained(model, prompt="a red circle", mask=seg, low_res=low, noise_level=200, **kw)
        sample_trained(model, prompt="a red circle", mask=seg, low_res=low, **kw)
    finally:
        handle.remove()
    first, second = seen[0], seen[3]  # the first step of each run (3 steps)
    assert sorted(first) == ["concat", "context", "context_mask", "vector"]
    assert first["concat"].shape == (4, 2 + 3 + 4, SIZE, SIZE)  # (uncond + cond, seg + low-res + inpaint, ...)
    assert not torch.equal(first["vector"], second["vector"])  # the augmentation level reaches the conditioner
    c = sample_trained(model, prompt=["a red circle", "a blue square"], **kw)
    assert c.shape == (4, 3, SIZE, SIZE)
    # init_image + mask feed the inpainting conditioner (and the segmentation condition is null)
    init = torch.zeros(3, SIZE, SIZE)
    d = sample_trained(model, init_image=init, mask=seg.float(), **kw)
    assert d.shape == (2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="give the mask"):
        sample_trained(model, init_image=init, **kw)


def test_latent_space_run_decodes_with_its_autoencoder(tmp_path):
    torch.manual_seed(0)
    ae_path = save_model(AutoencoderKL(tiny_autoencoder_kl()), tmp_path / "vae.safetensors")
    threads = torch.get_num_threads()
    train_diffusion(config(tmp_path / "latent", autoencoder=str(ae_path), steps=2), progress=False)
    torch.set_num_threads(threads)
    model = load_run(tmp_path / "latent")
    assert model.autoencoder is not None and model.downsampling_factor == 4
    assert model.data_shape == (4, SIZE // 4, SIZE // 4) and model.image_size == (SIZE, SIZE)
    assert model.scaling_factor == 1.0  # tiny-vae's scaling_factor
    x = sample_trained(model, class_label=0, num_images=2, steps=3, guidance_scale=2.0)
    assert x.shape == (2, 3, SIZE, SIZE) and torch.isfinite(x).all()
    fill = torch.zeros(SIZE, SIZE)
    fill[:8] = 1
    y = sample_trained(model, class_label=0, init_image=torch.zeros(3, SIZE, SIZE), mask=fill, steps=3)
    assert y.shape == (1, 3, SIZE, SIZE)


def test_a_run_decodes_through_a_swapped_autoencoder_with_the_same_encoder(tmp_path):
    """`--vae` / load_run(autoencoder=): the same latents, another decoder; a different latent width is refused."""
    from openldm.cli import main

    torch.manual_seed(0)
    ae = AutoencoderKL(tiny_autoencoder_kl())
    save_model(ae, tmp_path / "vae.safetensors")
    tuned = AutoencoderKL(tiny_autoencoder_kl())
    tuned.load_state_dict(ae.state_dict())
    with torch.no_grad():
        tuned.decoder.conv_out.bias.add_(0.5)  # a different decoder, the same encoder
    save_model(tuned, tmp_path / "tuned.safetensors")
    save_model(AutoencoderKL(tiny_autoencoder_kl(z_channels=8)), tmp_path / "wide.safetensors")
    threads = torch.get_num_threads()
    train_diffusion(config(tmp_path / "run", autoencoder=str(tmp_path / "vae.safetensors"), steps=1), progress=False)
    torch.set_num_threads(threads)
    own, swapped = load_run(tmp_path / "run"), load_run(tmp_path / "run", autoencoder=tmp_path / "tuned.safetensors")
    a = sample_trained(own, class_label=0, steps=2, seed=3)
    b = sample_trained(swapped, class_label=0, steps=2, seed=3)
    with torch.no_grad():  # same UNet and noise: b is the tuned decoder applied to a's latents
        latents = own.autoencoder.encode(torch.zeros(1, 3, SIZE, SIZE)).mode()
        assert torch.equal(latents, swapped.autoencoder.encode(torch.zeros(1, 3, SIZE, SIZE)).mode())
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="4-channel latents"):
        load_run(tmp_path / "run", autoencoder=tmp_path / "wide.safetensors")
    out = tmp_path / "g.png"
    args = ["generate", "--model", str(tmp_path / "run"), "--class-label", "0", "--steps", "2", "--seed", "3", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--vae", str(tmp_path / "tuned.safetensors"), "--out", str(tmp_path / "t.png")]) == 0
    assert Image.open(out).tobytes() != Image.open(tmp_path / "t.png").tobytes()
    assert main([*args, "--vae", str(tmp_path / "wide.safetensors"), "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------------ colour response

@pytest.mark.slow
def test_class_conditional_samples_take_the_asked_for_colour(tmp_path):
    """Label = colour of the one shape; after 300 steps (about 75 s on a busy 2-core CPU) the EMA model's samples,
    guided at scale 5, have the asked-for dominant colour far more often than chance (1/6)."""
    cfg = config(tmp_path / "colour", steps=300, batch_size=32, optim={"lr": 2e-3}, ema_decay=0.99,
                 data={"name": "shapes", "options": {"size": SIZE, "num_samples": 512, "num_objects": 1}},
                 conditions=[{"kind": "class_label", "options": {"num_classes": 6, "dim": 32}, "drop_prob": 0.1}])
    start = time.perf_counter()
    train_diffusion(cfg, progress=False)
    trained_s = time.perf_counter() - start
    model = load_run(tmp_path / "colour")
    per_class = 8
    x = sample_trained(model, class_label=list(range(6)), num_images=per_class, steps=20, guidance_scale=5.0)
    wanted = torch.arange(6).repeat_interleave(per_class)
    accuracy = (dominant_color(x) == wanted).float().mean().item()
    print(f"trained 300 steps in {trained_s:.0f} s; colour accuracy {accuracy:.2f} (chance {1 / 6:.2f})")
    assert accuracy >= 0.35


# ------------------------------------------------------------------------------ data facts, crop, export

@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    """Pixel-space class-conditional run on 64 Fashion-MNIST images padded 28 -> 32: plumbing, not quality."""
    out = tmp_path_factory.mktemp("fmnist_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = config(out, data={"name": "fashion_mnist", "options": {"size": 32, "limit": 64}},
                 conditions=[{"kind": "class_label", "options": {"num_classes": 10, "dim": 16}}],
                 unet={"model_channels": 16, "norm_groups": 4, "in_channels": 1, "out_channels": 1})
    train_diffusion(cfg, progress=False)
    torch.set_num_threads(threads)
    return out


def test_runs_record_their_data_facts_and_samples_are_cropped_to_the_dataset_size(fmnist_run):
    import json

    from openldm.data.idx import FASHION_MNIST_CLASSES

    facts = json.loads((fmnist_run / "data.json").read_text())
    assert facts == {"data_shape": [1, 32, 32], "image_size": [32, 32], "image_channels": 1,
                     "class_names": FASHION_MNIST_CLASSES, "crop_size": [28, 28]}
    model = load_run(fmnist_run)
    assert model.crop_size == (28, 28) and model.image_size == (32, 32) and model.channels == 1
    cropped = sample_trained(model, class_label=3, steps=2, seed=1)
    full = sample_trained(model, class_label=3, steps=2, seed=1, crop=False)
    assert cropped.shape == (1, 1, 28, 28) and full.shape == (1, 1, 32, 32)
    assert torch.equal(cropped, full[..., 2:30, 2:30])
    assert sample_trained(model, class_label=3, steps=2, height=40, width=40).shape[-1] == 40  # other sizes: no crop


def test_a_run_loads_from_its_data_json_when_the_dataset_is_absent(fmnist_run, tmp_path):
    import shutil

    import yaml

    moved = tmp_path / "moved"
    shutil.copytree(fmnist_run, moved)
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["data"]["options"]["root"] = str(tmp_path / "nowhere")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = load_run(moved)
    assert model.data_shape == (1, 32, 32) and model.class_names[9] == "ankle boot"
    assert sample_trained(model, class_label="ankle boot", steps=2).shape == (1, 1, 28, 28)


def test_a_run_without_data_json_probes_its_dataset_for_the_same_facts(fmnist_run, tmp_path):
    """Runs written before runs had a data.json: shape and class names come from the dataset config instead."""
    import json
    import shutil

    moved = tmp_path / "old"
    shutil.copytree(fmnist_run, moved)
    facts = json.loads((moved / "data.json").read_text())
    (moved / "data.json").unlink()
    model = load_run(moved)
    assert model.data_shape == tuple(facts["data_shape"]) and model.class_names == facts["class_names"]


def test_exported_runs_hold_half_precision_weights_and_sample_like_the_run(fmnist_run, tmp_path):
    from openldm.io.native import read_metadata
    from openldm.pipelines.trained import export_run

    out = export_run(fmnist_run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["conditioner.safetensors", "config.yaml", "data.json",
                                                     "unet_ema.safetensors"]
    half = load_file(str(out / "unet_ema.safetensors"))
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    assert read_metadata(out / "unet_ema.safetensors")["openldm.kind"] == "unet"
    a = sample_trained(load_run(fmnist_run), class_label=[0, 7], steps=3, seed=2)
    b = sample_trained(load_run(out), class_label=[0, 7], steps=3, seed=2)
    assert next(load_run(out).unet.parameters()).dtype == torch.float32
    assert (a - b).abs().max() < 2e-2  # float16 weights, float32 compute


def test_exported_latent_runs_carry_their_autoencoder(tmp_path):
    from openldm.pipelines.trained import export_run

    ae = AutoencoderKL(tiny_autoencoder_kl(in_channels=3, out_channels=3))
    save_model(ae, tmp_path / "ae.safetensors")
    run = tmp_path / "run"
    train_diffusion(config(run, autoencoder=str(tmp_path / "ae.safetensors"), unet_preset="tiny-unet",
                           unet={"model_channels": 16, "norm_groups": 4}), progress=False)
    out = export_run(run, tmp_path / "export")
    (tmp_path / "ae.safetensors").unlink()  # the export must not need the original
    model = load_run(out)
    assert model.autoencoder is not None and model.data_shape == (4, SIZE // 4, SIZE // 4)
    assert sample_trained(model, class_label=1, steps=2).shape == (1, 3, SIZE, SIZE)


def test_generate_samples_a_run_directory_and_refuses_sd_only_flags(fmnist_run, tmp_path):
    from openldm.cli import main

    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(fmnist_run), "--class-label", "sandal", "--steps", "2",
                 "--num-images", "3", "--grid", "--out", str(out), "--quiet"]) == 0
    assert Image.open(out).size == (2 + 2 * 30, 2 + 2 * 30)  # 2x2 tiles of 28 px with 2 px gaps
    assert main(["generate", "--model", str(fmnist_run), "--prompt", "x", "--steps", "2", "--out", str(out),
                 "--quiet"]) == 2  # the model has no text condition: a one-line error
    assert main(["generate", "--model", str(fmnist_run), "--class-label", "1", "--negative-prompt", "y",
                 "--out", str(out)]) == 2


def test_a_run_written_before_low_res_factor_moved_still_loads(tmp_path):
    """Runs trained before the factor moved into the low_res condition store a top-level ``low_res_factor``;
    load_run moves it into the condition's options (what a new config must spell out itself)."""
    import yaml

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_diffusion(config(tmp_path / "run", steps=1, conditions=[
        {"kind": "low_res", "options": {"embed_dim": 16, "factor": 4}}]), progress=False)
    torch.set_num_threads(threads)
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del stored["conditions"][0]["options"]["factor"]
    stored["low_res_factor"] = 2
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(stored))
    model = load_run(tmp_path / "run")
    assert model.conditioner.conditioners["low_res"].config.factor == 2
    x = sample_trained(model, low_res=torch.zeros(1, 3, 8, 8), steps=2)
    assert x.shape == (1, 3, SIZE, SIZE)


def test_a_run_finds_its_clip_text_tower_inside_itself_wherever_it_is_loaded_from(tmp_path, monkeypatch):
    """The clip text backend's ``path`` resolves in the run directory first (as the autoencoder does), so a run
    that carries its CLIP file can be moved; without the file the error names the run's path in one line."""
    torch.manual_seed(0)
    save_model(SmallCLIP(tiny_contrastive_config((3, 32, 32))), tmp_path / "tower.safetensors")
    cfg = config(tmp_path / "run", conditions=[
        {"kind": "text", "options": {"backend": "clip", "path": str(tmp_path / "tower.safetensors")}}])
    write_untrained_run(tmp_path / "run", cfg)
    kw = dict(prompt="a red circle", num_images=2, steps=2, guidance_scale=2.0, seed=0)
    reference = sample_trained(load_run(tmp_path / "run"), **kw)
    shutil.copytree(tmp_path / "run", tmp_path / "moved")  # as an exported run: its CLIP file inside, by bare name
    data = yaml.safe_load((tmp_path / "moved" / "config.yaml").read_text())
    data["conditions"][0]["options"]["path"] = "tower.safetensors"
    (tmp_path / "moved" / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "tower.safetensors").rename(tmp_path / "moved" / "tower.safetensors")
    monkeypatch.chdir(tmp_path / "moved" / "..")  # the bare name does not exist relative to the working directory
    assert torch.equal(sample_trained(load_run(tmp_path / "moved"), **kw), reference)
    (tmp_path / "moved" / "tower.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="text encoder 'tower.safetensors' was not found.*put it in the run"):
        load_run(tmp_path / "moved")


def test_exported_clip_conditioned_runs_carry_their_text_tower(tmp_path):
    """export_run copies the CLIP file a clip text condition names (float16, renamed text_encoder.safetensors in
    the config), so the export samples like the run without the original; the tower computes in float32."""
    from openldm.pipelines.trained import export_run

    torch.manual_seed(0)
    save_model(SmallCLIP(tiny_contrastive_config((3, 32, 32))), tmp_path / "tower.safetensors")
    cfg = config(tmp_path / "run", conditions=[
        {"kind": "text", "options": {"backend": "clip", "path": str(tmp_path / "tower.safetensors")}}])
    write_untrained_run(tmp_path / "run", cfg)
    kw = dict(prompt="a red circle", num_images=2, steps=2, guidance_scale=2.0, seed=0)
    reference = sample_trained(load_run(tmp_path / "run"), **kw)
    out = export_run(tmp_path / "run", tmp_path / "export")
    (tmp_path / "tower.safetensors").unlink()  # the export must not need the original
    assert yaml.safe_load((out / "config.yaml").read_text())["conditions"][0]["options"]["path"] == \
        "text_encoder.safetensors"
    assert all(v.dtype == torch.float16 for v in load_file(str(out / "text_encoder.safetensors")).values()
               if v.is_floating_point())
    model = load_run(out)
    tower = model.conditioner.conditioners["text"].prompt_encoder
    assert all(p.dtype == torch.float32 for p in tower.parameters())
    assert (sample_trained(model, **kw) - reference).abs().max() < 2e-2  # float16 weights, float32 compute
