"""Every paper preset and stage, structurally: the config the training script builds from its flags and recipe, the
full loss stack of that recipe (aux teachers, LPIPS, L_sp, GAN heads; randomly initialised frozen networks built
here, never a download), one forward + backward on the meta device (no memory, no compute). Every parameter
that requires a gradient must receive one and every frozen one none: the condition DDP's reducer needs."""
import contextlib

import pytest
import torch

import train_tokenizer as tt
from aligntok import DINOv2Encoder
from diffusion import DiT, Transport
from diffusion import make_config as make_denoiser_config
from diffusion import recipe as denoiser_recipe
from discriminator import DinoDiscTrunk, GANLoss, NLayerDiscriminator, dino_discriminator
from mactok import DINOv2Teacher
from pretrained import LPIPS, SIGLIP_SO400M, DINOv2Target, DinoViT, FeatureTarget, SigLIPViT, ViTConfig, dinov2_config
from tokenizer import RECIPES, STAGES, build, make_config, param_groups, stage_config

META = torch.device("meta")
CASES = [("MAETok-B-128", "main"), ("MAETok-B-128", "decoder_finetune"),
         ("MacTok-B-64", "main"), ("MacTok-B-64", "decoder_finetune"),
         ("MacTok-B-128", "main"), ("MacTok-B-128", "decoder_finetune"),
         ("AlignTok-L-f16d32", "align"), ("AlignTok-L-f16d32", "perceptual"), ("AlignTok-L-f16d32", "decoder"),
         ("AlignTok-L-f16d32", "scratch"), ("AlignTok-L-f16d64", "perceptual"),
         ("MacTok-S-128", "main"), ("MacTok-BL-64-512", "main")]


@pytest.fixture(autouse=True)
def meta_autocast(monkeypatch):
    """torch.autocast knows no 'meta' device: the fp32 regions the models open become no-ops there."""
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: contextlib.nullcontext()
                        if device_type == "meta" else real(device_type, *a, **k))


def script_config(preset, stage):
    """The args and config train_tokenizer.py derives for `--preset P --stage S` (its recipe, its overrides)."""
    _, args, explicit = tt.parse_args(["--preset", preset, "--stage", stage])
    tt.engine.apply_recipe(args, RECIPES[preset][stage], explicit)
    family = make_config(preset).family
    return args, stage_config(make_config(preset, **tt.FAMILY_SETUP[family][0](args)), stage)


def dinov2_patch_target(cfg, arch):
    """MAETok's / MacTok's DINOv2 teacher converted to the tokenizer's patch, random weights."""
    vc = dinov2_config(arch)
    vc = ViTConfig(**{**vc.__dict__, "patch_size": cfg.patch_size, "img_size": cfg.image_size})
    return DINOv2Target(DinoViT(vc).eval().requires_grad_(False), cfg.grid_size, "patch")


def loss_stack(model, cfg, args):
    """Teachers, LPIPS, the L_sp reference and the GAN the recipe turns on, all frozen but the GAN heads."""
    aux = getattr(model, "aux", {})
    if "dinov2" in aux:
        model.set_feature_target("dinov2", dinov2_patch_target(cfg, args.dinov2_arch))
    if "siglip" in aux:
        vit = SigLIPViT(*SIGLIP_SO400M, patch_size=cfg.patch_size).eval().requires_grad_(False)
        model.set_feature_target("siglip", FeatureTarget(vit))
    if cfg.family == "mactok" and (cfg.align or cfg.semantic_mask_prob > 0):
        model.set_teacher(DINOv2Teacher(dinov2_patch_target(cfg, args.dinov2_arch)))
    lpips = LPIPS().eval().requires_grad_(False) if args.perceptual_weight > 0 else None
    ref = None
    if cfg.family == "aligntok" and args.stage == "perceptual":
        ref = build(cfg).eval().requires_grad_(False)
    gan = None
    if args.disc == "dino":
        disc = dino_discriminator(DinoDiscTrunk().eval().requires_grad_(False))
        gan = GANLoss(disc, 0, args.disc_weight, args.lecam_weight, args.cr_weight)
    elif args.disc == "patchgan":
        gan = GANLoss(NLayerDiscriminator(), 0, args.disc_weight, 0.0, 0.0, augment=False, d_weight=1.0)
    return lpips, ref, gan


def assert_ddp_condition(named, what):
    missing = [n for n, p in named if p.requires_grad and p.grad is None]
    stray = [n for n, p in named if not p.requires_grad and p.grad is not None]
    assert not missing, f"{what}: trained parameters without a gradient (DDP would fail): {missing[:5]}"
    assert not stray, f"{what}: frozen parameters with a gradient: {stray[:5]}"


@pytest.mark.parametrize("preset,stage", CASES)
def test_every_trained_parameter_of_a_paper_stage_gets_a_gradient(preset, stage):
    args, cfg = script_config(preset, stage)
    with META:  # built on the meta device; masks are drawn on the CPU as the script draws them
        model = build(cfg)
        lpips, ref, gan = loss_stack(model, cfg, args)
    param_groups(model, stage, args.weight_decay)                          # freezes what the stage does not train
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=META)
    st = STAGES[cfg.family][stage]
    ratio = {"drawn": None, "anneal": getattr(cfg, "mask_ratio", 0.0), "none": 0.0}[st.mask]
    teacher = model.teach(x)
    mask = model.sample_mask(2, META, ratio, teacher)
    out = tt.generator_loss(model, model, x, mask, teacher, lpips, 1.0, ref, args.sp_weight, gan)
    out["loss"].backward()
    assert_ddp_condition(list(model.named_parameters()), f"{preset} {stage}")
    for frozen in (lpips, ref, gan):
        assert frozen is None or all(p.grad is None for p in frozen.parameters()), "the G step touched a frozen net"
    if gan is not None:  # the D step: every head (BatchNorm, spectral norm) trains, the trunk never
        gan.discriminator_loss(gan.disc, x, out["rec"].detach())["loss"].backward()
        assert_ddp_condition(list(gan.disc.named_parameters()), f"{preset} {stage} discriminator")
        assert any(p.requires_grad for p in gan.disc.parameters())


@pytest.mark.parametrize("preset,latent", [("SiT-XL", dict(num_tokens=128, in_channels=32)),
                                            ("LightningDiT-XL", dict(num_tokens=256, grid=(16, 16), in_channels=32))])
def test_every_parameter_of_a_paper_denoiser_gets_a_gradient(preset, latent):
    """SiT-XL on MAETok's 128 tokens, LightningDiT-XL on VA-VAE's 16 x 16 grid, with each recipe's loss."""
    cfg = make_denoiser_config(preset, **latent)
    rec = denoiser_recipe(preset)
    with META:
        model = DiT(cfg).train()
    x = torch.randn(2, cfg.num_tokens, cfg.in_channels, device=META)
    y = torch.tensor([3, 7], device=META)
    Transport(rec["time_dist"], cosine_loss=rec["cosine_loss"]).loss(model, x, y)["loss"].backward()
    assert_ddp_condition(list(model.named_parameters()), preset)


def test_aligntok_encoder_follows_the_image_size():
    """AlignTok-L at 64 px: DINOv2 sees grid * 14 = 56 px (4 x 4 tokens), not 224, so the grid matches z's."""
    _, cfg = script_config("AlignTok-L-f16d32", "align")
    assert DINOv2Encoder("vitl14", cfg.grid_size).size == 224
    from dataclasses import replace
    small = replace(cfg, image_size=64)
    with META:
        model = build(small)
        z = model.encode(torch.randn(1, 3, 64, 64))
        assert tuple(z.shape) == (1, 16, 32) and tuple(model.decode(z).shape) == (1, 3, 64, 64)


def test_mactok_encoder_init_and_aligntok_encoder_read_their_own_flags(monkeypatch):
    """--encoder_init_ckpt is MacTok's DINOv2 start, --encoder_ckpt AlignTok's frozen encoder: one flag, one meaning."""
    seen = []

    def fake_load(arch, ckpt=None, **k):
        seen.append((arch, ckpt))
        raise FileNotFoundError("stop here")
    monkeypatch.setattr(tt, "load_dinov2", fake_load)
    _, args, _ = tt.parse_args(["--preset", "MacTok-B-128", "--encoder_init_ckpt", "b.pth", "--encoder_ckpt", "a.pth"])
    with pytest.raises(SystemExit, match="MacTok encoder init"):
        tt.init_encoder_from_dinov2(None, args, make_config("MacTok-B-128"))
    _, args, _ = tt.parse_args(["--preset", "AlignTok-L-f16d32", "--encoder_init_ckpt", "b.pth", "--encoder_ckpt",
                                "a.pth"])
    with pytest.raises(SystemExit, match="AlignTok encoder"):
        tt.init_aligntok_encoder(None, args, make_config("AlignTok-L-f16d32"))
    assert seen == [("vitb14", "b.pth"), ("vitl14", "a.pth")]
    with pytest.raises(SystemExit):                                        # the old MacTok spelling: named
        tt.resolve_flags(*tt.parse_args(["--preset", "MacTok-tiny", "--encoder_ckpt", "b.pth"]), 1)
