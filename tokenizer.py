"""
The tokenizer interface every script uses, over the families: MAETok (maetok.py), MacTok (mactok.py), AlignTok and
the LDM autoencoders of VA-VAE / diffusers releases (aligntok.py). Each family file holds its config, model,
presets, training stages and recipes; this file gathers them (it imports the families, never the reverse).

Every family: a config dataclass with a `family` field and named presets, build(cfg), from_checkpoint(ckpt dict;
released.load reads any path), encode(x) -> (B, L, C) (a grid tokenizer also reports its (H, W) as `grid`),
decode(z), forward(x, ...) -> dict of scalar losses with 'loss' (plus the reconstruction 'rec' that the trainer's
perceptual and adversarial terms need), and its stages: what each one trains (param_groups). A latent_map
tokenizer (latent_map.py) wraps a trained tokenizer with an invertible linear map of its latents (of a grid's
positions on a grid tokenizer).
"""
import json
from dataclasses import dataclass, replace

import aligntok
import maetok
import mactok
from aligntok import VAVAE, AlignTok, AlignTokConfig, VAVAEConfig
from latent_map import LatentMapConfig, LatentMapped
from maetok import MAETok, TokenizerConfig
from mactok import MacTok, MacTokConfig


@dataclass(frozen=True)
class Stage:
    trains: tuple    # parameter-name prefixes that train ('' = all)
    keep_aux: bool   # False: the training-only parts go (MAETok's aux decoders, MacTok's KL and alignment)
    mask: str        # 'drawn': a ratio per batch / sample; 'anneal': mask_ratio -> 0 linearly; 'none'
    init: bool       # starts from the EMA weights of a previous stage (--init_from)


FAMILIES = {"maetok": (TokenizerConfig, MAETok), "mactok": (MacTokConfig, MacTok),
            "aligntok": (AlignTokConfig, AlignTok), "vavae": (VAVAEConfig, VAVAE),
            "autoencoderkl": (VAVAEConfig, VAVAE), "latent_map": (LatentMapConfig, LatentMapped)}
TRAINED = {"maetok": maetok, "mactok": mactok, "aligntok": aligntok}  # the families train_tokenizer.py trains
STAGES = {family: {name: Stage(**s) for name, s in m.STAGES.items()} for family, m in TRAINED.items()}
# the config overrides that drop a family's training-only parts (a later stage, every released-style checkpoint)
INFERENCE_CONFIG = {**{family: m.INFERENCE_CONFIG for family, m in TRAINED.items()}, "vavae": {}, "autoencoderkl": {},
                    "latent_map": {}}
PRESETS = {**maetok.PRESETS, **mactok.PRESETS, **aligntok.PRESETS}
RECIPES = {**maetok.RECIPES, **mactok.RECIPES, **aligntok.RECIPES}
NO_DECAY = ("pos_embed", "cls_token", "mask_token", "latent_tokens", "rope.freqs", "recon_token", "gamma")


def param_groups(model, stage, weight_decay):
    """AdamW groups of what `stage` trains (the rest, and what the model calls frozen, is frozen): decay on
    >= 2-D non-embedding weights."""
    trains = STAGES[model.cfg.family][stage].trains
    frozen = model.frozen() if hasattr(model, "frozen") else ()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trains) and name not in frozen)
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith(NO_DECAY) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    return FAMILIES[p["family"]][0](**{**p, **overrides})


def stage_config(cfg, stage):
    """The config a stage trains: decoder fine-tuning drops the training-only parts (aux decoders, alignment)."""
    return cfg if STAGES[cfg.family][stage].keep_aux else replace(cfg, **INFERENCE_CONFIG[cfg.family])


def build(cfg):
    if cfg.family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {cfg.family!r}; nanotok has {sorted(FAMILIES)}")
    if cfg.family == "latent_map":  # a wrapper: its base first
        base = config_from_dict(cfg.base)
        return LatentMapped(build(replace(base, **INFERENCE_CONFIG[base.family])), cfg)
    return FAMILIES[cfg.family][1](cfg)


def config_from_dict(d):
    """A config of any family from a checkpoint's dict (checkpoints older than `family` are MAETok)."""
    family = d.get("family", "maetok")
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; nanotok has {sorted(FAMILIES)}")
    return FAMILIES[family][0](**{**d, "family": family})


def comparable_config(d):
    """A tokenizer config as it reads back from JSON (tuples become lists), aux decoders aside: what a latent
    cache and a diffusion checkpoint record to check that latents come from the same tokenizer."""
    d = {**d, "family": d.get("family", "maetok")}
    return json.loads(json.dumps({**d, **{k: [] for k in ("aux_targets", "align") if k in d}}))


def from_checkpoint(ckpt, ema=True):
    """A trained tokenizer of any family (aux decoders dropped), frozen in eval mode, from a train_tokenizer.py
    checkpoint dict (released.load reads any path: run folder, checkpoint file, or an official release): EMA
    weights by default, or a released-style dict holding only `ema`."""
    if not isinstance(ckpt, dict):
        raise TypeError(f"from_checkpoint takes a checkpoint dict; read a path with released.load({ckpt!r})")
    cfg = config_from_dict(ckpt["config"])
    cfg = replace(cfg, **INFERENCE_CONFIG[cfg.family])
    sd = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    model = build(cfg)
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(model.TRAIN_ONLY_PARAMS)})
    return model.eval().requires_grad_(False)
