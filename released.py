"""
Released weights of the papers' official code, read in their own file formats and converted to nanotok
checkpoints by strict key maps: every tensor of the file is either mapped or dropped for a stated reason, and
every nanotok tensor is filled.

  MAETok   continuous_tokenizer AEModel / MaskAEModel (Hugging Face MAETok/maetok-b-128, -b-128-512): a folder
           (or a weight file with config.json beside it) of config.json (the ModelArgs fields) and
           model.safetensors, else pytorch_model.bin, as PyTorchModelHubMixin.from_pretrained reads it

  SiT      willisma/SiT (SiT-XL-2-256x256.pt: a bare state dict; training files {model, ema, opt, args})
  MAETok's continuous_tokenizer SiT(vae_1d=True) (Hugging Face MAETok/sit-xl_maetok-b-128: config.json +
  1D SiT     model.safetensors; trainer files {model, ema, ...})
  LightningDiT  hustvl/LightningDiT (lightningdit-xl-imagenet256-*.pt: {ema, ...} or a bare state dict)
  VA-VAE   hustvl/LightningDiT's tokenizer (vavae-imagenet256-f16d32-dinov2.pt: a Lightning checkpoint), the
           grid tokenizer aligntok.VAVAE that LightningDiT's releases decode with
  AutoencoderKL  diffusers' format (a folder of config.json + diffusion_pytorch_model.safetensors / .bin):
           stabilityai/sd-vae-ft-ema and -mse (SD-VAE, the tokenizer of DiT / SiT / REPA), REPA-E's exports; the
           same LDM network as VA-VAE under diffusers' names, with the pipeline's latent scaling

  python evaluate.py recon --ckpt path/to/maetok-b-128 --data_path /data/imagenet/val    # any script's --ckpt
  python sample.py --ckpt path/to/sit-xl_maetok-b-128 --tokenizer_ckpt path/to/maetok-b-128

The denoisers become diffusion.DiT. Their fixed tables (sin-cos pos_embed, LightningDiT's RoPE cos / sin) are
stored in the files; DiT computes them, so the loader checks that the stored ones are those tables. SiT and
LightningDiT run t = 0 as noise: their config gets sit_time, and DiT.forward converts (diffusion.py).
"""
import json
import math
import os
import re
import sys
from dataclasses import asdict

import torch

import engine
from diffusion import DiT, DiTConfig, rope_table, sincos_pos_embed
from tokenizer import build, make_config

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin",                       # PyTorchModelHubMixin (MAETok)
                "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers (AutoencoderKL)


def release_files(path):
    """(config.json, weight file) of an official release folder or weight file, or None if `path` is not one."""
    if os.path.isdir(path):
        folder, weights = path, next((os.path.join(path, f) for f in WEIGHT_FILES
                                      if os.path.isfile(os.path.join(path, f))), None)
    elif os.path.isfile(path) and path.endswith((".safetensors", ".bin")):
        folder, weights = os.path.dirname(os.path.abspath(path)), path
    else:
        return None
    config = os.path.join(folder, "config.json")
    return (config, weights) if weights and os.path.isfile(config) else None


def strict_map(out, own, what, into):
    """The mapped tensors as float32 in the order of `own` (a meta state dict): every key filled, none left over."""
    missing = [k for k in own if k not in out]
    bad = [k for k in out if k not in own or tuple(out[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise KeyError(f"{what} does not map onto {into}: missing {missing[:4]}, unexpected or wrong shape {bad[:4]}")
    return {k: out[k].float() for k in own}


def read_state_dict(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # the format's own reader (no pickle)
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# MAETok: official key -> nanotok key

AUX_NAMES = {"hog": "hog", "dino": "dinov2", "clip": "siglip"}    # official decoder_X -> nanotok aux target
# never read by the official forward (golden README, MAETok section): dropped
UNUSED = ("projection.",                 # the REPA MLP; MaskAEModel.encode never calls it
          "repa_model.", "clip_model.",  # frozen teachers (DINOv2-L, SigLIP), not part of a tokenizer
          "hog_generator.")              # constant Sobel / Gaussian kernels, recomputed by maetok.HOG
UNUSED_IN_DECODERS = ("model.pos_embed", "model.patch_embed.", "model.head.", "model.norm.adaLN_modulation.")
# the final MoVQNorm modulates only the latent positions, and only the patch positions are read out: its
# adaLN cannot change the output, so nanotok's plain LayerNorm is exact (maetok.Decoder)


def _decoder_key(rest, prefix):
    """A key of an official TimmViTDecoder (after 'decoder.' / 'decoder_X.') -> nanotok, or None if unused."""
    if rest.startswith(UNUSED_IN_DECODERS) or rest.startswith("freqs"):
        return None
    if rest.startswith("model.blocks."):
        return prefix + rest[len("model."):].replace("adaLN_modulation.", "ada.")
    if rest == "model.cls_token":
        return prefix + "cls_token"
    if rest in ("mask_token", "latent_pos_embed"):
        return prefix + rest
    if rest.startswith("to_pixel.model."):
        return prefix + "head." + rest.split(".")[-1]
    raise KeyError(f"unknown official MAETok decoder key {rest!r}")


def maetok_key(k):
    """Official MAETok key -> nanotok key (None: dropped; RoPE tables are handled by maetok_rope)."""
    if k.startswith(UNUSED):
        return None
    if k.startswith("encoder."):
        rest = k[len("encoder."):]
        if rest.startswith("freqs"):
            return None
        if rest in ("latent_tokens", "latent_pos_embed", "mask_token"):
            return k
        if rest.startswith("model.patch_embed.proj."):
            return "encoder.patch_embed." + rest.split(".")[-1]
        if rest.startswith("model."):
            return "encoder." + rest[len("model."):]
        raise KeyError(f"unknown official MAETok encoder key {k!r}")
    if k.startswith("quant_conv."):
        return "encoder.to_latent." + k.split(".")[-1]
    if k.startswith("post_quant_conv."):
        return "decoder.from_latent." + k.split(".")[-1]
    if k.startswith("decoder."):
        return _decoder_key(k[len("decoder."):], "decoder.")
    for off, ours in AUX_NAMES.items():
        if k.startswith(f"decoder_{off}."):
            return _decoder_key(k[len(f"decoder_{off}."):], f"aux.{ours}.")
        if k.startswith(f"post_quant_conv_{off}."):
            return f"aux.{ours}.from_latent." + k.split(".")[-1]
        if k.startswith(f"to_pixel_{off}."):
            return f"aux.{ours}.head." + k.split(".")[-1]
    raise KeyError(f"unknown official MAETok key {k!r}: not a continuous_tokenizer AEModel / MaskAEModel file")


def maetok_rope(freqs, heads):
    """Official <m>.freqs (2, depth, heads * hd/2), head-major, [fx; fy] -> per block (heads, hd/2, 2)."""
    _, depth, n = freqs.shape
    return [freqs[:, i].reshape(2, heads, n // heads).permute(1, 2, 0).contiguous() for i in range(depth)]


def _module_prefixes(sd):
    """(official module prefix, nanotok prefix) of every ViT that carries a RoPE table."""
    out = [("encoder.", "encoder."), ("decoder.", "decoder.")]
    return out + [(f"decoder_{o}.", f"aux.{n}.") for o, n in AUX_NAMES.items() if f"decoder_{o}.freqs" in sd]


def maetok_config(sd, model_args, heads=None):
    """A nanotok TokenizerConfig from the official ModelArgs and the tensor shapes. Heads are not recoverable from
    the weights: head dim 64 (every timm ViT MAETok uses) unless `heads` = (encoder, decoder, aux) is given."""
    a = model_args
    if not a.get("use_rope", False) or a.get("use_ape", False) or a.get("dec_cls_token", False):
        raise ValueError("this MAETok file is the variant without RoPE-mixed (use_rope false, APE or a decoder cls "
                         "token: the released script's literal defaults); nanotok implements the paper's RoPE model")
    if a.get("to_pixel", "linear") != "linear" or a.get("enc_type", "vit") != "vit":
        raise ValueError(f"MAETok to_pixel={a.get('to_pixel')!r} enc_type={a.get('enc_type')!r}: nanotok has the "
                         f"ViT encoder and the linear pixel head of the paper")
    count = lambda p: len({k.split(".")[3] for k in sd if k.startswith(p + "model.blocks.")})
    width = lambda p: sd[p + "mask_token"].shape[-1]
    aux_off = [o for o in AUX_NAMES if f"decoder_{o}.mask_token" in sd]
    aux = tuple(AUX_NAMES[o] for o in aux_off)
    enc_w, dec_w = width("encoder."), width("decoder.")
    aux_w, aux_depth = (width(f"decoder_{aux_off[0]}."), count(f"decoder_{aux_off[0]}.")) if aux else (192, 3)
    heads = heads or (enc_w // 64, dec_w // 64, aux_w // 64)
    p = int(a.get("enc_patch_size", 16))
    feature_dims = {n: sd[f"to_pixel_{o}.weight"].shape[0] for o, n in AUX_NAMES.items()
                    if n in aux and o != "hog"}
    return make_config("MAETok-B-128", image_size=int(a["image_size"]), patch_size=p, enc_width=enc_w,
                       enc_depth=count("encoder."), enc_heads=heads[0], dec_width=dec_w, dec_depth=count("decoder."),
                       dec_heads=heads[1], num_latent_tokens=sd["encoder.latent_tokens"].shape[1],
                       latent_dim=sd["quant_conv.weight"].shape[0], rope="mixed",
                       rope_theta=float(a.get("rope_theta", 10.0)),
                       mask_ratio=float(a.get("enc_token_drop_max", 0.6)),
                       mask_ratio_min=float(a.get("enc_token_drop", 0.4)), aux_targets=aux, aux_width=aux_w,
                       aux_depth=aux_depth, aux_heads=heads[2],
                       feature_dims={"dinov2": 1024, "siglip": 1152, **feature_dims})


def maetok_from_official(sd, model_args, heads=None):
    """(TokenizerConfig, nanotok state dict) from an official MAETok state dict, strictly."""
    cfg = maetok_config(sd, model_args, heads)
    with torch.device("meta"):
        own = build(cfg).state_dict()
    out = {}
    for k, v in sd.items():
        ours = maetok_key(k)
        if ours is not None:
            out[ours] = v
    hs = {"encoder.": cfg.enc_heads, "decoder.": cfg.dec_heads}
    for off, ours in _module_prefixes(sd):
        for i, f in enumerate(maetok_rope(sd[off + "freqs"], hs.get(off, cfg.aux_heads))):
            out[f"{ours}blocks.{i}.attn.rope.freqs"] = f
        g, i = cfg.grid_size, torch.arange(cfg.grid_size ** 2).float()  # stored coordinates: our row-major grid
        if off + "freqs_t_x" in sd and not (torch.equal(sd[off + "freqs_t_x"].float(), i % g)
                                            and torch.equal(sd[off + "freqs_t_y"].float(), i.div(g).floor())):
            raise ValueError(f"{off}freqs_t_x / _y are not the row-major {g}x{g} patch grid")
    if "encoder.mask_token" not in sd:  # enc_token_drop = 0: the encoder never masks; nanotok's token stays 0
        out["encoder.mask_token"] = torch.zeros(own["encoder.mask_token"].shape)
    return cfg, strict_map(out, own, "official MAETok file", "nanotok's MAETok")


def locate(path):
    """The file or folder a checkpoint path names: an official release as it is, else a nanotok checkpoint file
    or a run folder's newest (engine.find_checkpoint)."""
    return path if release_files(path) else engine.find_checkpoint(path)


def load(path):
    """Any checkpoint as a nanotok checkpoint dict, the one place that decides what a file is: nanotok's own
    (train_tokenizer.py / train_diffusion.py runs), an official release folder or weight file with config.json
    (MAETok, MAETok's SiT, diffusers AutoencoderKL), an official SiT / LightningDiT file or a VA-VAE file."""
    if release_files(path):
        try:
            return load_release(path)
        except (KeyError, ValueError, OSError) as e:
            sys.exit(f"error: cannot read the release {path!r}: {e}")
    ckpt = engine.load_checkpoint(path)
    if isinstance(ckpt, dict) and "args" in ckpt:                            # nanotok's own
        return ckpt
    file = engine.find_checkpoint(path)
    sd = unwrap_denoiser(ckpt)
    if denoiser_kind(sd) is not None:
        try:
            return denoiser_checkpoint(sd, file)
        except (KeyError, ValueError) as e:
            sys.exit(f"error: cannot convert the official denoiser {path!r}: {e}")
    try:
        if vavae_state(ckpt) is not None:
            return vavae_checkpoint(ckpt, file)
    except (KeyError, ValueError) as e:
        sys.exit(f"error: cannot convert the VA-VAE file {path!r}: {e}")
    return ckpt


def load_release(path):
    """An official release (folder or weight file with config.json) -> a nanotok checkpoint dict that every
    script reads like its own: config, model = ema = the released weights, the source recorded."""
    config_path, weights = release_files(path)
    with open(config_path) as f:
        model_args = json.load(f)
    sd = read_state_dict(weights)
    if denoiser_kind(sd) is not None:
        return denoiser_checkpoint(sd, weights, model_args)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        return autoencoderkl_checkpoint(sd, model_args, weights)
    if not any(k.startswith("encoder.model.patch_embed.") for k in sd):
        raise KeyError(f"{weights!r} is neither an official MAETok file (no encoder.model.patch_embed.* keys) "
                       f"nor a SiT / LightningDiT one")
    cfg, state = maetok_from_official(sd, model_args)
    out = {"config": asdict(cfg), "model": state, "ema": state, "step": 0,
           "args": {"preset": "released", "source": os.path.abspath(weights)}, "released": os.path.abspath(weights)}
    if "vq_mean" in model_args or "vq_std" in model_args:  # the scalar normalisation its SiT was trained with
        out["latent_stats"] = {"mean": torch.tensor(float(model_args.get("vq_mean", 0.0))),
                               "std": torch.tensor(float(model_args.get("vq_std", 1.0)))}
    return out


def maetok_to_official(sd, cfg):
    """nanotok MAETok state dict -> the official key layout (AEModel, plus the aux decoders): the inverse map,
    used to test the loader round trip and to hand a nanotok tokenizer to the official code."""
    inverse = {}
    prefixes = [("encoder.", "encoder.", cfg.enc_depth), ("decoder.", "decoder.", cfg.dec_depth)]
    prefixes += [(f"decoder_{o}.", f"aux.{n}.", cfg.aux_depth) for o, n in AUX_NAMES.items() if n in cfg.aux_targets]
    official_keys = []
    for off, ours, depth in prefixes:
        official_keys += [off + k for k in ("mask_token", "latent_pos_embed")]
        block = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
                 "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
        block += (["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma"]
                  if ours == "encoder." else ["adaLN_modulation.1.weight", "adaLN_modulation.1.bias"])
        official_keys += [f"{off}model.blocks.{i}.{b}" for i in range(depth) for b in block]
    official_keys += ["encoder.latent_tokens", "encoder.model.cls_token", "encoder.model.pos_embed",
                      "encoder.model.patch_embed.proj.weight", "encoder.model.patch_embed.proj.bias",
                      "encoder.model.norm.weight", "encoder.model.norm.bias", "quant_conv.weight", "quant_conv.bias",
                      "post_quant_conv.weight", "post_quant_conv.bias", "decoder.to_pixel.model.weight",
                      "decoder.to_pixel.model.bias"]
    for o, n in AUX_NAMES.items():
        if n in cfg.aux_targets:
            official_keys += [f"decoder_{o}.model.cls_token"] + [f"{w}_{o}.{p}" for w in ("post_quant_conv", "to_pixel")
                                                                 for p in ("weight", "bias")]
    for k in official_keys:
        inverse[k] = sd[maetok_key(k)]
    for off, ours, depth in prefixes:
        f = torch.stack([sd[f"{ours}blocks.{i}.attn.rope.freqs"] for i in range(depth)], 1)  # (h, depth, hd/2, 2)
        inverse[off + "freqs"] = f.permute(3, 1, 0, 2).reshape(2, depth, -1)  # (2, depth, heads * hd/2)
        g = cfg.grid_size
        inverse[off + "freqs_t_x"] = (torch.arange(g * g) % g).float()
        inverse[off + "freqs_t_y"] = (torch.arange(g * g) // g).float()
    return inverse



# ----------------------------------------------------------------------------------------------------------
# denoisers: SiT, MAETok's 1D SiT and LightningDiT -> diffusion.DiT

DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT / SiT S, B, L, XL: the head count is not in the weights
TABLE_ATOL = 1e-4  # the official tables are float32 (MAETok's 1D table and the RoPE tables computed in float32)


def unwrap_denoiser(obj):
    """A torch.load result -> a bare state dict: the EMA of a training file (SiT find_model, LightningDiT
    inference.py and continuous_tokenizer generate_sit.py all read 'ema'), '_orig_mod.' of torch.compile removed."""
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    if not isinstance(obj, dict):
        return {}
    return {k.replace("_orig_mod.", ""): v for k, v in obj.items()}


def denoiser_kind(sd):
    """'sit' (willisma/SiT), 'maetok_sit' (continuous_tokenizer, vae_1d), 'lightningdit', or None."""
    if not all(k in sd for k in ("pos_embed", "t_embedder.mlp.0.weight", "final_layer.linear.weight")):
        return None
    if "feat_rope.freqs_cos" in sd:
        return "lightningdit"
    if "x_embedder.proj.weight" in sd:
        return "sit"
    return "maetok_sit" if "x_embedder.weight" in sd else None


def denoiser_config(sd, kind, hub_config=None, heads=None):
    """A DiTConfig from the tensor shapes (plus the hub config.json of MAETok's SiT, which names the heads)."""
    T, D = sd["pos_embed"].shape[1:]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hub = hub_config or {}
    if kind == "lightningdit":
        heads = D // sd["feat_rope.freqs_cos"].shape[1]
    heads = heads or hub.get("num_heads") or DIT_HEADS.get(D)
    if heads is None:
        raise ValueError(f"width {D}: the head count is not in the weights and not a DiT size; pass heads")
    if kind == "maetok_sit":
        C, p, grid, L = sd["x_embedder.weight"].shape[1], 1, None, T
    else:
        _, C, p, _ = sd["x_embedder.proj.weight"].shape
        side = math.isqrt(T) * p
        grid, L = (side, side), side * side
    out = sd["final_layer.linear.weight"].shape[0]
    if out not in (p * p * C, 2 * p * p * C):
        raise ValueError(f"final layer {out} outputs for patch {p} and {C} channels: not a SiT / LightningDiT")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[1 if swiglu else 0]
    return DiTConfig(in_channels=C, num_tokens=L, grid=grid, patch_size=p, learn_sigma=out == 2 * p * p * C,
                     pos_embed="sincos_interleaved" if kind == "maetok_sit" else "sincos",
                     sit_time=kind != "maetok_sit", width=D, depth=depth, heads=heads,
                     mlp_ratio=round(hidden * (1.5 if swiglu else 1) / D, 4),
                     num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, class_dropout=0.1,
                     norm="rmsnorm" if "blocks.0.norm1.weight" in sd else "layernorm",
                     ffn="swiglu" if swiglu else "gelu", rope=kind == "lightningdit",
                     qk_norm="blocks.0.attn.q_norm.weight" in sd)


def fixed_tables(cfg):
    """The tables DiT computes, under their official keys (what a released file stores)."""
    p = cfg.patch_size
    grid = None if cfg.grid is None else (cfg.grid[0] // p, cfg.grid[1] // p)
    tokens = cfg.num_tokens // p ** 2
    out = {"pos_embed": sincos_pos_embed(cfg.width, tokens, grid, cfg.pos_embed == "sincos_interleaved")[None]}
    if cfg.rope:
        out["feat_rope.freqs_cos"], out["feat_rope.freqs_sin"] = rope_table(cfg.width // cfg.heads, tokens, grid)
    return out


def denoiser_key(k):
    """Official SiT / LightningDiT key -> DiT key."""
    if k.startswith("x_embedder.proj."):
        return "x_embedder." + k.split(".")[-1]
    return {"y_embedder.embedding_table.weight": "y_embedder.table.weight",
            "final_layer.norm_final.weight": "final_layer.norm.weight"}.get(k, k)


def denoiser_from_official(sd, hub_config=None, heads=None):
    """(DiTConfig, DiT state dict) from an official state dict, strictly; the stored tables must be DiT's."""
    kind = denoiser_kind(sd)
    if kind is None:
        raise KeyError("not an official SiT / LightningDiT state dict (needs pos_embed, t_embedder.*, final_layer.*)")
    cfg = denoiser_config(sd, kind, hub_config, heads)
    for k, table in fixed_tables(cfg).items():
        err = (sd[k].float() - table).abs().max().item() if sd[k].shape == table.shape else float("inf")
        if err > TABLE_ATOL:
            raise ValueError(f"the stored {k} {tuple(sd[k].shape)} is not the fixed table nanotok's DiT computes "
                             f"(max difference {err:.3g}): this file was trained with a learned or different table")
    with torch.device("meta"):
        own = DiT(cfg).state_dict()
    out = {}
    for k, v in sd.items():
        if k in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
            continue  # checked above; DiT computes them
        if k == "x_embedder.proj.weight":  # Conv2d(C, D, p, p) -> Linear on (row, column, channel) cells
            v = v.permute(0, 2, 3, 1).reshape(v.shape[0], -1)
        out[denoiser_key(k)] = v
    return cfg, strict_map(out, own, f"official {kind} file", "DiT")


# ----------------------------------------------------------------------------------------------------------
# VA-VAE (hustvl/LightningDiT vavae-imagenet256-f16d32-dinov2.pt): a Lightning checkpoint whose 'state_dict' holds
# the autoencoder (encoder., decoder., quant_conv., post_quant_conv.) beside the training-only loss.* (LPIPS, the
# PatchGAN), foundation_model.* (the frozen DINOv2) and linear_proj.* (the VF projection), all dropped here as
# VA_VAE's own loader drops them (it keeps strict=False; the map below is strict on what the autoencoder needs).

VAVAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
VAVAE_TRAIN_ONLY = ("loss.", "foundation_model.", "linear_proj.")


def vavae_state(obj):
    """The autoencoder tensors of a VA-VAE file (Lightning {'state_dict': ...} or bare), or None if it is not one."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or "encoder.conv_in.weight" not in sd or "post_quant_conv.weight" not in sd:
        return None
    left = [k for k in sd if not k.startswith(VAVAE_PARTS + VAVAE_TRAIN_ONLY)]
    if left:
        raise KeyError(f"VA-VAE file has tensors nanotok cannot place: {left[:4]}")
    return {k: v for k, v in sd.items() if k.startswith(VAVAE_PARTS)}


def vavae_config(sd, image_size=256):
    """VAVAEConfig from the tensor shapes; the image size (which fixes where attention sits) is not in the file:
    the release is 256 px."""
    from aligntok import VAVAEConfig
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    attn = tuple(image_size // 2 ** i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    return VAVAEConfig(image_size=image_size, patch_size=2 ** (levels - 1), latent_dim=sd["post_quant_conv.weight"].shape[1],
                       z_channels=sd["decoder.conv_in.weight"].shape[1], ch=ch, ch_mult=mult, num_res_blocks=blocks,
                       attn_resolutions=attn)


def vavae_checkpoint(obj, source, image_size=256):
    """A VA-VAE file's contents -> a nanotok tokenizer checkpoint dict (the official names are nanotok's)."""
    from aligntok import VAVAE
    sd = vavae_state(obj)
    cfg = vavae_config(sd, image_size)
    with torch.device("meta"):
        own = VAVAE(cfg).state_dict()
    state = strict_map(sd, own, "VA-VAE file", "nanotok's VA-VAE")
    return {"config": asdict(cfg), "model": state, "ema": state, "step": 0, "released": os.path.abspath(source),
            "args": {"preset": "released-vavae", "source": os.path.abspath(source)}}


# what each release samples with (the papers' settings; README "Sample from released weights")
GUIDE_CHANNELS = {"sit": 3, "lightningdit": 3, "maetok_sit": None}  # forward_with_cfg's [:, :3]; MAETok: all


def denoiser_checkpoint(obj, source, hub_config=None):
    """An official denoiser (file contents) -> a nanotok diffusion checkpoint dict (no tokenizer, no latent
    statistics: sample.py takes them from --tokenizer_ckpt / --latent_stats)."""
    sd = unwrap_denoiser(obj)
    kind = denoiser_kind(sd)
    cfg, state = denoiser_from_official(sd, hub_config)
    return {"config": asdict(cfg), "model": state, "ema": state, "step": 0, "released": os.path.abspath(source),
            "released_kind": kind, "guide_channels": GUIDE_CHANNELS[kind],
            "args": {"preset": f"released-{kind}", "source": os.path.abspath(source)}}


# ----------------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL (SD-VAE and its kin): diffusers names -> the LDM names of aligntok's autoencoder.
# Mid-block attention is a Linear q / k / v / out over the channels (an LDM 1x1 conv); files written by older
# diffusers (the 2022 SD-VAE releases) name them query / key / value / proj_attn. up_blocks run from the lowest
# resolution; LDM's `up` is indexed from the highest (up.{L-1-i}).

AKL_RENAMES = [(r"\.conv_norm_out\.", ".norm_out."), (r"\.conv_shortcut\.", ".nin_shortcut."),
               (r"\.mid_block\.resnets\.0\.", ".mid.block_1."), (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
               (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."), (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
               (r"\.attn_1\.(to_q|query)\.", ".attn_1.q."), (r"\.attn_1\.(to_k|key)\.", ".attn_1.k."),
               (r"\.attn_1\.(to_v|value)\.", ".attn_1.v."),
               (r"\.attn_1\.(to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
               (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
               (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.")]


def autoencoderkl_key(k, levels):
    for pattern, repl in AKL_RENAMES:
        k = re.sub(pattern, repl, k)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", k)
    if m:
        k = f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.{m[3]}"
    return k


def autoencoderkl_config(c):
    """VAVAEConfig of a diffusers AutoencoderKL config.json; what nanotok's LDM network cannot express is an error."""
    from aligntok import VAVAEConfig
    bo, ch = list(c["block_out_channels"]), c["block_out_channels"][0]
    plain = all(t == "DownEncoderBlock2D" for t in c.get("down_block_types", [])) and \
        all(t == "UpDecoderBlock2D" for t in c.get("up_block_types", []))
    if any(b % ch for b in bo) or not plain or c.get("act_fn", "silu") != "silu" or \
            not c.get("mid_block_add_attention", True) or not c.get("use_quant_conv", True) or \
            not c.get("use_post_quant_conv", True):
        raise ValueError(f"an AutoencoderKL config nanotok does not express (block_out_channels {bo}, block types, "
                         f"act_fn, mid-block attention or quant convs off): {c}")
    size = c.get("sample_size", 256)  # diffusers' tiling default (SDXL's VAE: 1024): nanotok feeds it 256 px at most
    size = min(256, size[0] if isinstance(size, (list, tuple)) else size)
    return VAVAEConfig(family="autoencoderkl", image_size=size, force_upcast=bool(c.get("force_upcast", True)),
                       patch_size=2 ** (len(bo) - 1), latent_dim=c["latent_channels"], z_channels=c["latent_channels"],
                       ch=ch, ch_mult=tuple(b // ch for b in bo), num_res_blocks=c["layers_per_block"],
                       attn_resolutions=(), norm_groups=c.get("norm_num_groups", 32))


def autoencoderkl_stats(c, C):
    """The latent normalisation of the release's own pipelines as nanotok's (mean, std): a denoiser sees
    (z - mean) / std. diffusers: z * scaling_factor (SD-VAE: 0.18215), (z - shift_factor) * scaling_factor where
    a shift is given, (z - latents_mean) * scaling_factor / latents_std where per-channel statistics are given."""
    scale = float(c.get("scaling_factor") or 0.18215)  # diffusers' default: the 2022 SD-VAE configs omit it
    if c.get("latents_mean") is not None and c.get("latents_std") is not None:
        mean, std = torch.tensor(c["latents_mean"]).float(), torch.tensor(c["latents_std"]).float() / scale
        how = f"(z - latents_mean) * {scale} / latents_std"
    else:
        mean, std = torch.tensor(float(c.get("shift_factor") or 0.0)), torch.tensor(1.0 / scale)
        how = f"(z - {float(mean)}) * {scale}"
    if mean.numel() not in (1, C) or std.numel() not in (1, C):
        raise ValueError(f"latents_mean / latents_std have {mean.numel()} / {std.numel()} values for {C} channels")
    return {"mean": mean, "std": std}, how


def autoencoderkl_checkpoint(sd, config, source):
    """A diffusers AutoencoderKL (state dict + config.json) -> a nanotok tokenizer checkpoint with the pipeline's
    latent normalisation as its latent_stats."""
    from aligntok import VAVAE
    cfg = autoencoderkl_config(config)
    with torch.device("meta"):
        own = VAVAE(cfg).state_dict()
    out = {}
    for k, v in sd.items():
        key = autoencoderkl_key(k, len(cfg.ch_mult))
        out[key] = v.view(*v.shape, 1, 1) if ".attn_1." in key and v.ndim == 2 else v  # Linear -> 1x1 conv
    state = strict_map(out, own, "diffusers AutoencoderKL file", "nanotok's LDM autoencoder")
    stats, how = autoencoderkl_stats(config, cfg.latent_dim)
    return {"config": asdict(cfg), "model": state, "ema": state, "step": 0, "released": os.path.abspath(source),
            "latent_stats": stats, "latent_normalisation": how,
            "args": {"preset": "released-autoencoderkl", "source": os.path.abspath(source)}}
