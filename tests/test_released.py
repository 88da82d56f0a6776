"""released.py: the official MAETok weights through the strict key map, against the official forward pass."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import released
from conftest import golden, golden_tensor
from released import maetok_from_official, maetok_to_official
from tokenizer import build, config_from_dict, make_config


def _official_small():
    fx = golden("maetok_maskae_small.pt")
    sd = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}
    sd.update(fx["constant_buffers"])
    return fx, sd


def _close(got, ref, tol=1e-5):
    torch.testing.assert_close(got, ref, atol=tol, rtol=1e-4)


def test_official_maetok_forward_matches_fixture_eval_and_train():
    fx, sd = _official_small()
    cfg, state = maetok_from_official(sd, fx["config"]["model_args"], heads=(3, 3, 3))
    assert cfg.aux_targets == ("hog", "dinov2", "siglip")
    model = build(cfg).eval()
    model.load_state_dict(state, strict=True)
    x, ev, tr = fx["inputs"]["x64"].float(), fx["outputs"]["eval"], fx["outputs"]["train"]
    tokens = []
    model.encoder.norm.register_forward_hook(lambda m, i, o: tokens.append(o))
    with torch.no_grad():
        z = model.encode(x)
        _close(tokens[0], ev["encoder_tokens"])
        _close(z, ev["z"])
        _close(model.decode(ev["z"]), ev["recon"])
        for off, ours in (("hog", "hog"), ("dino", "dinov2"), ("clip", "siglip")):
            _close(model.aux[ours](ev["z"]), ev[f"{off}_pred"])
        mask = tr["mask"].bool()  # the official mask (drawn inside its encoder), injected
        z = model.encode(x, mask)
        _close(z, tr["z"])
        _close(model.decode(tr["z"]), tr["recon"])
        preds = {o: model.aux[n](tr["z"]) for o, n in (("hog", "hog"), ("dino", "dinov2"), ("clip", "siglip"))}
    for o in preds:
        _close(preds[o], tr[f"{o}_pred"])
    m = mask.unsqueeze(-1).float()
    _close(((preds["hog"] - tr["hog_target"]) ** 2 * m).sum() / m.sum() / 108, tr["loss_hog"])
    for o in ("dino", "clip"):
        cos = F.cosine_similarity(preds[o], tr[f"{o}_target"], dim=-1).unsqueeze(-1)
        _close(-(cos * m).sum() / m.sum(), tr[f"loss_{o}"], tol=1e-6)
    # the nanotok losses of the same forward agree (HOG recomputed, feature targets plugged in as stored)
    model.set_feature_target("dinov2", lambda img: tr["dino_target"])
    model.set_feature_target("siglip", lambda img: tr["clip_target"])
    with torch.no_grad():
        out = model(x, mask)
    for o, n in (("hog", "hog"), ("dino", "dinov2"), ("clip", "siglip")):
        _close(out[n], tr[f"loss_{o}"], tol=1e-5)


def test_real_b128_key_list_maps_strictly_onto_the_paper_preset():
    fx = golden("maetok_maskae_small.pt")
    lists = list(fx["real_state_dict_keys"].values())
    args = {"image_size": 256, "use_rope": True, "rope_mixed": True, "rope_theta": 10.0, "use_ape": False,
            "dec_cls_token": False, "enc_patch_size": 16, "enc_token_drop": 0.4, "enc_token_drop_max": 0.6}
    for keys in (lists[0], lists[0] + lists[1]):  # the inference AEModel, then a MaskAEModel training dict
        g = 16
        sd = {}
        for k, s, _ in keys:
            sd[k] = torch.zeros(s)
            if k.endswith("freqs_t_x"):
                sd[k] = (torch.arange(g * g) % g).float()
            elif k.endswith("freqs_t_y"):
                sd[k] = (torch.arange(g * g) // g).float()
        cfg, state = maetok_from_official(sd, args)
        ref = make_config("MAETok-B-128", aux_targets=cfg.aux_targets)
        assert cfg == ref and (cfg.enc_heads, cfg.dec_heads) == (12, 12)
        # AEModel's 173,891,360 parameters less the three unused decoder tensors (pos_embed, patch_embed, norm adaLN)
        unused = 257 * 768 + (768 * 3 * 16 * 16 + 768) + (2 * 768 * 32 + 2 * 768)
        assert sum(v.numel() for k, v in state.items() if not k.startswith("aux.")) == 173_891_360 - unused
    assert cfg.aux_targets == ("hog", "dinov2", "siglip")


def test_release_folder_round_trip_through_every_script(tmp_path):
    """A nanotok tokenizer written in the official layout as a Hugging Face style release (config.json +
    model.safetensors) loads back bitwise, and the scripts take the folder as --ckpt / --tokenizer_ckpt."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    cfg = make_config("tiny", enc_width=128, enc_heads=2, dec_width=128, dec_heads=2, aux_targets=())
    model = build(cfg).eval()
    rel = tmp_path / "maetok-release"
    rel.mkdir()
    save_file(maetok_to_official(model.state_dict(), cfg), str(rel / "model.safetensors"))
    json.dump({"image_size": 32, "enc_patch_size": 4, "use_rope": True, "rope_mixed": True, "rope_theta": 10.0,
               "use_ape": False, "dec_cls_token": False, "enc_token_drop": 0.4, "enc_token_drop_max": 0.6,
               "to_pixel": "linear", "enc_type": "vit"}, open(rel / "config.json", "w"))
    ck = released.load(str(rel))
    back = build(config_from_dict(ck["config"])).eval()
    back.load_state_dict(ck["ema"], strict=True)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert ck["released"].endswith("model.safetensors") and released.locate(str(rel)) == str(rel)
    from tokenizer import from_checkpoint
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        assert torch.equal(from_checkpoint(released.load(str(rel))).decode(model.encode(x)), model.decode(model.encode(x)))
    import evaluate
    from dataclasses import asdict
    from proxy import ProxyConfig, ProxyNet
    net = ProxyNet(ProxyConfig(32, 10, width=4))  # random weights: only the plumbing is under test here
    torch.save({"model": net.state_dict(), "proxy_config": asdict(net.cfg)}, tmp_path / "proxy.pt")
    res = evaluate.main(["recon", "--ckpt", str(rel), "--num_images", "16", "--batch_size", "8", "--lpips", "0",
                         "--feature_net", "proxy", "--proxy_ckpt", str(tmp_path / "proxy.pt"),
                         "--out", str(tmp_path / "r.json")])
    assert res["num_images"] == 16 and 0 < res["psnr"] < 60
    import cache_latents
    cache_latents.main(["--tokenizer_ckpt", str(rel), "--cache_path", str(tmp_path / "cache"), "--builtin_size", "16",
                        "--num_workers", "0"])
    assert os.path.exists(tmp_path / "cache")


def test_not_a_release_is_a_clear_error(tmp_path):
    rel = tmp_path / "rel"
    rel.mkdir()
    torch.save({"foo": torch.zeros(1)}, rel / "pytorch_model.bin")
    json.dump({}, open(rel / "config.json", "w"))
    with pytest.raises(SystemExit, match="neither an official MAETok file"):
        released.load(str(rel))
    with pytest.raises(ValueError, match="without RoPE-mixed"):
        maetok_from_official({}, {"use_rope": False})
