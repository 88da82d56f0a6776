"""
Released weights of the papers' official code, read in their own file formats and converted to nanotok
checkpoints by strict key maps: every tensor of the file is either mapped or dropped for a stated reason, and
every nanotok tensor is filled.

  MAETok   continuous_tokenizer AEModel / MaskAEModel (Hugging Face MAETok/maetok-b-128, -b-128-512): a folder
           (or a weight file with config.json beside it) of config.json (the ModelArgs fields) and
           model.safetensors, else pytorch_model.bin, as PyTorchModelHubMixin.from_pretrained reads it

  python evaluate.py recon --ckpt path/to/maetok-b-128 --data_path /data/imagenet/val    # any script's --ckpt
"""
import json
import os
from dataclasses import asdict

import torch

from tokenizer import build, make_config

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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
          "hog_generator.")              # constant Sobel / Gaussian kernels, recomputed by tokenizer.HOG
UNUSED_IN_DECODERS = ("model.pos_embed", "model.patch_embed.", "model.head.", "model.norm.adaLN_modulation.")
# the final MoVQNorm modulates only the latent positions, and only the patch positions are read out: its
# adaLN cannot change the output, so nanotok's plain LayerNorm is exact (tokenizer.Decoder)


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
    missing = [k for k in own if k not in out]
    bad = [k for k in out if k not in own or tuple(out[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise KeyError(f"official MAETok file does not map onto nanotok's MAETok: missing {missing[:4]}, "
                       f"unexpected or wrong shape {bad[:4]}")
    return cfg, {k: out[k].float() for k in own}


def load_release(path):
    """An official release (folder or weight file with config.json) -> a nanotok checkpoint dict that every
    script reads like its own: config, model = ema = the released weights, the source recorded."""
    config_path, weights = release_files(path)
    with open(config_path) as f:
        model_args = json.load(f)
    sd = read_state_dict(weights)
    if not any(k.startswith("encoder.model.patch_embed.") for k in sd):
        raise KeyError(f"{weights!r} is not an official MAETok file (no encoder.model.patch_embed.* keys)")
    cfg, state = maetok_from_official(sd, model_args)
    return {"config": asdict(cfg), "model": state, "ema": state, "step": 0,
            "args": {"preset": "released", "source": os.path.abspath(weights)}, "released": os.path.abspath(weights)}


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

