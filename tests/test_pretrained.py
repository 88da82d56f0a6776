"""pretrained.py against the golden fixtures and the reference lpips package."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import golden, golden_tensor
from pretrained import load_lpips, lpips_head_weights


def _golden_lpips():
    fx = golden("lpips_vgg.pt")
    sd = {k: golden_tensor(k, shape) for k, shape, _ in fx["state_dict_keys"]}  # official torchvision keys
    sd["classifier.0.weight"] = torch.zeros(1)  # a real file also holds the classifier; it is ignored
    return fx, load_lpips(vgg_state_dict=sd)


def test_lpips_matches_official_fixture():
    fx, model = _golden_lpips()
    for k, (s, a, first) in fx["weight_checksums"].items():  # the real heads from the wheel, as in the fixture
        if k.startswith("REAL:"):
            w = lpips_head_weights()[int(k[len("REAL:lin")])].double()
            assert abs(w.sum().item() - s) < 1e-4 and abs(w.abs().sum().item() - a) < 1e-4
    x0, x1 = fx["inputs"]["in0"].float(), fx["inputs"]["in1"].float()
    out = fx["outputs"]
    with torch.no_grad():
        torch.testing.assert_close(model(x0, x1), out["lpips"], atol=1e-5, rtol=1e-4)
        for got, ref in zip(model.per_layer(x0, x1), out["per_layer"]):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(x0, x1, spatial=True), out["lpips_spatial_map"], atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_lpips_equals_reference_package():
    # the reference imports torchvision; its compiled ops cannot load next to the CPU torch, so stub them
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    vgg = {}
    for k, v in ref.net.state_dict().items():  # net.slice{k}.{i}.weight -> features.{i}.weight
        _, i, p = k.split(".")
        vgg[f"features.{i}.{p}"] = v
    ours = load_lpips(vgg_state_dict=vgg)
    x0, x1 = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x0, x1), ref(x0, x1), atol=1e-5, rtol=1e-4)


def test_offline_without_path_is_a_clear_error(offline, tmp_path):
    with pytest.raises(RuntimeError, match=r"vgg16-397923af\.pth.*https://download\.pytorch\.org.*--vgg_ckpt"):
        load_lpips()
    with pytest.raises(FileNotFoundError, match="--vgg_ckpt"):
        load_lpips(str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="not a torchvision VGG16"):
        load_lpips(str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------------------------------------------------
# FID Inception, DINOv2, DINO v1: golden fixtures through the project's own loaders

def _rule_state_dict(fx):
    return {k: golden_tensor(k, shape) for k, shape, _ in fx["state_dict_keys"]}


def _close(got, ref):
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_golden_rule_checksums():
    fx = golden("dinov2_small_custom.pt")
    sd = _rule_state_dict(fx)
    for k, (s, a, first) in fx["weight_checksums"].items():
        t = sd[k].double()
        assert abs(t.sum().item() - s) < 1e-6 * max(1, abs(s)) and abs(t.flatten()[0].item() - first) < 1e-6


def test_fid_inception_matches_official_fixture():
    from pretrained import load_inception
    fx = golden("fid_inception.pt")
    sd = {k: v for k, v in _rule_state_dict(fx).items() if not k.endswith("num_batches_tracked")}  # optional
    model = load_inception(state_dict=sd, resize="pytorch_fid")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for name in ("u64", "u299"):
        x, out = fx["inputs"][name].float() / 255, fx["outputs"][name]
        with torch.no_grad():
            maps, _ = model.blocks(model.preprocess(x))
            res = model(x)
        for i, m in enumerate(maps):
            _close(F.adaptive_avg_pool2d(m, 1).flatten(1), out[f"block{i}_pooled"])
        _close(maps[0][:2, :, ::8, ::8], out["block0_spatial_sub"])
        _close(maps[1][:2, :, ::4, ::4], out["block1_spatial_sub"])
        _close(maps[2][:2, :, ::4, ::4], out["block2_spatial_sub"])
        _close(res["pool3"], out["block3_pooled"])
        _close(res["logits"], out["logits"])
        _close(res["logits_unbiased"] + model.fc.bias, out["logits"])
        assert res["spatial"].shape == (4, 17 * 17 * 7)


def test_tf1_resize_is_identity_at_299_and_matches_the_closed_form():
    from pretrained import resize_bilinear_tf1
    x = torch.rand(1, 3, 299, 299)
    torch.testing.assert_close(resize_bilinear_tf1(x, 299), x)
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)  # TF1: source = dst * in / out, no half pixel
    y = resize_bilinear_tf1(x, 8)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([0, .5, 1, 1.5, 2, 2.5, 3, 3]))


@pytest.mark.parametrize("fixture", ["dinov2_small_custom.pt", "dinov2_small_custom_reg4.pt"])
def test_dinov2_matches_official_fixture(fixture):
    from pretrained import ViTConfig, load_dinov2
    fx = golden(fixture)
    c = fx["config"]
    cfg = ViTConfig(c["embed_dim"], c["depth"], c["num_heads"], c["patch_size"], c["img_size"],
                    num_register_tokens=c["num_register_tokens"], interpolate_offset=c["interpolate_offset"],
                    interpolate_antialias=c["interpolate_antialias"])
    model = load_dinov2(state_dict=_rule_state_dict(fx), cfg=cfg)
    for name, x in fx["inputs"].items():
        x, out = x.float(), fx["outputs"][name]
        with torch.no_grad():
            _close(model.interpolate_pos_encoding(*x.shape[-2:]), out["pos_embed_interpolated"])
            f = model.forward_features(x)
            for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
                _close(f[k], out[k])
            _close(model(x), out["forward"])
            for (p, c_), rp, rc in zip(model.get_intermediate_layers(x, 2, norm=True, return_class_token=True),
                                       out["intermediate_n2_norm"], out["intermediate_n2_norm_cls"]):
                _close(p, rp)
                _close(c_, rc)
            _close(model.get_intermediate_layers(x, [0], norm=False)[0], out["intermediate_idx0_nonorm"][0])


def test_dinov2_patch16_conversion_matches_timm_fixture():
    from pretrained import ViTConfig, dinov2_target, load_dinov2
    fx = golden("timm_dinov2_p16_256.pt")
    cfg = ViTConfig(96, 3, 3)
    model = load_dinov2(state_dict=_rule_state_dict(fx), cfg=cfg, patch_size=16, grid=16)
    out = fx["outputs"]
    _close(model.patch_embed.proj.weight, out["patch_embed_resampled"])
    _close(model.pos_embed, out["pos_embed_resampled"])
    x = fx["inputs"]["x256"].float()
    with torch.no_grad():
        f = model.forward_features(x)
    _close(torch.cat([f["x_norm_clstoken"][:, None], f["x_norm_patchtokens"]], 1), out["forward_features"])
    # as an aux target: ImageNet-normalised [-1, 1] image -> (B, 256, D); the REPA-style resize gives the same grid
    img = torch.rand(2, 3, 256, 256) * 2 - 1
    sd = _rule_state_dict(fx)
    assert dinov2_target(256, 16, state_dict=sd, cfg=cfg)(img).shape == (2, 256, 96)
    assert dinov2_target(256, 16, mode="resize", state_dict=sd, cfg=cfg)(img).shape == (2, 256, 96)


def test_dino_v1_and_disc_trunk_match_official_fixture():
    from discriminator import load_dino_disc_trunk
    from pretrained import ViTConfig, load_dino_v1
    fx = golden("dino_v1_vits16_custom.pt")
    cfg = ViTConfig(96, 3, 3, patch_size=16, img_size=224, layerscale=False)
    sd = _rule_state_dict(fx)
    model = load_dino_v1(state_dict=sd, cfg=cfg)
    for name in ("x224", "x128x160"):
        x, out = fx["inputs"][name].float(), fx["outputs"][name]
        with torch.no_grad():
            _close(model.interpolate_pos_encoding(*x.shape[-2:]), out["pos_embed_interpolated"])
            _close(model(x), out["forward_cls"])
            for got, ref in zip(model.block_outputs(x, 2), out["intermediate_n2"]):
                _close(model.norm(got), ref)
            if "last_selfattention" in out:
                _close(model.get_last_selfattention(x), out["last_selfattention"])
    trunk = load_dino_disc_trunk(state_dict=sd, cfg=cfg, key_depths=(1, 2))
    with torch.no_grad():
        acts = trunk(fx["inputs"]["x160_disc"].float())
    assert len(acts) == 3
    for got, ref in zip(acts, fx["outputs"]["maetok_dinodisc_trunk"]):
        _close(got, ref)


def test_wrong_checkpoint_and_offline_errors_name_the_file_and_flag(offline):
    from pretrained import load_dino_v1, load_dinov2, load_inception
    with pytest.raises(RuntimeError, match=r"pt_inception-2015-12-05-6726825d\.pth.*github.com.*--inception_ckpt"):
        load_inception()
    with pytest.raises(RuntimeError, match=r"dinov2_vitl14_reg4_pretrain\.pth.*--dinov2_ckpt"):
        load_dinov2("vitl14", registers=True)
    with pytest.raises(RuntimeError, match=r"dino_deitsmall16_pretrain\.pth.*--dino_ckpt"):
        load_dino_v1()
    with pytest.raises(KeyError, match="not the expected official DINOv2 vits14"):
        load_dinov2("vits14", state_dict={"cls_token": torch.zeros(1, 1, 384)})


def test_dinov2_plugs_into_maetok_as_aux_target():
    from pretrained import ViTConfig, dinov2_target
    from tokenizer import MAETok, make_config
    fx = golden("timm_dinov2_p16_256.pt")
    torch.manual_seed(0)
    model = MAETok(make_config("tiny", aux_targets=("hog", "dinov2"), feature_dims={"dinov2": 96})).train()
    model.set_feature_target("dinov2", dinov2_target(32, 4, state_dict=_rule_state_dict(fx), cfg=ViTConfig(96, 3, 3)))
    losses = model(torch.rand(2, 3, 32, 32) * 2 - 1, model.sample_mask(2, "cpu"))
    assert -1 <= losses["dinov2"].item() <= 1 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert model.aux["dinov2"].head.weight.grad.abs().sum() > 0


def test_siglip_matches_official_fixture_in_both_file_formats():
    from pretrained import siglip_target
    fx = golden("timm_siglip_p16_256.pt")
    out = fx["outputs"]
    target = siglip_target(16, state_dict=_rule_state_dict(fx), arch=(96, 2, 3))  # OpenCLIP file: visual.trunk.*
    vit = target.vit
    _close(vit.patch_embed.proj.weight, out["patch_embed_resampled"])
    with torch.no_grad():
        _close(vit.forward_features(fx["inputs"]["x256"].float()), out["forward_features"])
        _close(vit.position_embedding(10, 10), out["x160"]["pos_embed_runtime"])
        _close(vit.forward_features(fx["inputs"]["x160"].float()), out["x160"]["forward_features"])
        x = torch.rand(2, 3, 32, 32) * 2 - 1  # the target applies ImageNet statistics to [-1, 1] images
        ref = vit.forward_features(((x + 1) / 2 - target.mean) / target.std)
        torch.testing.assert_close(target(x), ref)
    native = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys_timm_native"]}
    vit = siglip_target(16, state_dict=native, arch=(96, 2, 3)).vit
    with torch.no_grad():
        _close(vit.forward_features(fx["inputs"]["x256"].float()), out["timm_native_format"]["forward_features"])
    assert not any(p.requires_grad for p in vit.parameters())
