"""pretrained.py against the golden fixtures and the reference lpips package."""
import sys
import types

import pytest
import torch

from conftest import golden, golden_tensor
from pretrained import LPIPS, load_lpips, lpips_head_weights


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


def test_offline_without_path_is_a_clear_error(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"vgg16-397923af\.pth.*https://download\.pytorch\.org.*--vgg_ckpt"):
        load_lpips()
    with pytest.raises(FileNotFoundError, match="--vgg_ckpt"):
        load_lpips(str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="not a torchvision VGG16"):
        load_lpips(str(tmp_path / "bad.pth"))
