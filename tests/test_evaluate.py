"""evaluate.py and proxy.py: metric math against closed forms and constructed cases, readers, the CLI."""
import json
import os

import numpy as np
import pytest
import torch
from scipy import linalg

import evaluate as ev
from conftest import golden, golden_tensor


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)  # diagonal: sum (sqrt s1 - sqrt s2)^2
    ref = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert abs(ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) - ref) < 1e-8
    A, B = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    S1, S2 = A @ A.T + np.eye(5), B @ B.T + np.eye(5)  # general: tr((S1^1/2 S2 S1^1/2)^1/2)
    r1 = linalg.sqrtm(S1).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(S1 + S2) - 2 * np.trace(linalg.sqrtm(r1 @ S2 @ r1).real)
    assert abs(ev.frechet_distance(mu1, S1, mu2, S2) - ref) < 1e-6


def test_fid_of_a_set_with_itself_is_zero_and_singular_covariances_work():
    f = np.random.default_rng(1).normal(size=(500, 16))
    mu, sigma = ev.gaussian_stats(f)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    few = f[:8]  # fewer points than dims: singular covariance -> eps fallback or a tiny imaginary part
    assert ev.frechet_distance(*ev.gaussian_stats(few), *ev.gaussian_stats(few)) < 1e-3


def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 8))
    assert ev.precision_recall(a, a) == (1.0, 1.0)
    assert ev.precision_recall(a, a + 100.0) == (0.0, 0.0)
    # half of the samples lie on the reference manifold, the other half far away; blocks do not matter
    b = np.concatenate([a[:150] + 1e-3, a[:150] + 100.0])
    p, r = ev.precision_recall(a, b, block=64)
    assert p == 0.5 and 0.4 < r < 1.0
    assert ev.precision_recall(a, b, block=64) == ev.precision_recall(a, b, block=10_000)


def test_inception_score_of_known_logits():
    assert abs(ev.inception_score(np.zeros((100, 10))) - 1.0) < 1e-9  # uniform predictions: 1
    logits = np.full((1000, 10), -1e4)
    logits[np.arange(1000), np.arange(1000) % 10] = 0  # confident, all classes equally: K
    assert abs(ev.inception_score(logits) - 10.0) < 1e-6
    assert abs(ev.inception_score(logits, split_size=100) - 10.0) < 1e-6


def test_psnr_and_ssim_known_cases():
    x = torch.randint(0, 250, (2, 16, 16, 3), dtype=torch.uint8)
    torch.testing.assert_close(ev.psnr(x, x + 5), torch.full((2,), 10 * np.log10(255 ** 2 / 25), dtype=torch.float64))
    torch.testing.assert_close(ev.ssim(x, x), torch.ones(2, dtype=torch.float64))
    a, b = torch.full((1, 16, 16, 3), 100, dtype=torch.uint8), torch.full((1, 16, 16, 3), 150, dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2
    torch.testing.assert_close(ev.ssim(a, b), torch.tensor([(2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1)],
                                                           dtype=torch.float64))
    noisy = lambda s: (x.float() + torch.randn(x.shape) * s).clamp(0, 255).to(torch.uint8)
    s1, s2 = ev.ssim(x, noisy(10)), ev.ssim(x, noisy(60))
    assert (s1 < 1).all() and (s2 < s1).all()
    ramp = torch.arange(16, dtype=torch.uint8).view(1, 1, 16, 1).expand(1, 16, 16, 3) * 3  # d/dcol = 3, d/drow = 0
    torch.testing.assert_close(ev.gradient_energy(ramp), torch.tensor([3.0], dtype=torch.float64))
    blur = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2).float(), 3, 1, 1).round().to(torch.uint8)
    assert (ev.gradient_energy(blur.permute(0, 2, 3, 1)) < ev.gradient_energy(x)).all()


def test_separable_ssim_equals_the_2d_window_and_scikit_image():
    """The separable Gaussian equals the 121-tap 2D window (float64); and scikit-image's SSIM with the Wang et al.
    settings where it is installed (it is no dependency of the project)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 40, 36, 3), dtype=torch.uint8, generator=g)
    y = (x.double() + 25 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 255).to(torch.uint8)
    n = torch.arange(11, dtype=torch.float64) - 5
    k = torch.exp(-n ** 2 / 4.5)
    w = torch.outer(k / k.sum(), k / k.sum()).expand(3, 1, 11, 11)
    a, b = (t.double().permute(0, 3, 1, 2) for t in (x, y))
    blur = lambda t: torch.nn.functional.conv2d(t, w, groups=3)
    ma, mb = blur(a), blur(b)
    saa, sbb, sab = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ref = (((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (saa + sbb + c2))).flatten(1).mean(1)
    torch.testing.assert_close(ev.ssim(x, y), ref, atol=1e-12, rtol=0)
    # they run where the images are (a GPU in evaluate.py recon), never copied to the CPU: on the meta device too
    m = x.to("meta")
    assert all(f(m, m).device.type == "meta" for f in (ev.psnr, ev.ssim)) and ev.gradient_energy(m).is_meta
    assert ev.pairwise_sq_dists(np.ones((3, 4)), np.ones((2, 4)), "meta").is_meta
    skimage = pytest.importorskip("skimage.metrics")
    sk = [skimage.structural_similarity(x[i].numpy(), y[i].numpy(), channel_axis=2, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, data_range=255) for i in range(2)]
    torch.testing.assert_close(ev.ssim(x, y), torch.tensor(sk, dtype=torch.float64), atol=1e-6, rtol=0)


def test_linear_probe_separable_and_shuffled():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3
    centers = torch.randn(3, 4, 2, generator=g) * 3
    z = centers[y] + 0.3 * torch.randn(600, 4, 2, generator=g)
    assert ev.linear_probe(z[:400], y[:400], z[400:], y[400:]) > 0.99
    noise = torch.randn(600, 4, 2, generator=g)
    assert abs(ev.linear_probe(noise[:400], y[:400], noise[400:], y[400:]) - 1 / 3) < 0.12


def test_gmm_nll_falls_with_k_and_flattens_past_the_true_k():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0], [6, 0], [0, 6], [6, 6]])
    x = centers[torch.arange(2000) % 4] + torch.randn(2000, 2, generator=g)
    nll = {k: ev.gmm_nll(x, k) for k in (1, 2, 4, 8)}
    assert nll[1] > nll[2] > nll[4]
    assert nll[4] - nll[8] < 0.1 * (nll[1] - nll[4])
    z = torch.randn(500, 10) @ torch.diag(torch.tensor([10.0, 5, 1, .1, .1, .1, .1, .1, .1, .1]))
    assert ev.pca_dim(z, 0.9) == 2 and ev.pca_standardize(z, 2).std(0).allclose(torch.ones(2, dtype=torch.float64))


def test_npz_readers_and_precomputed_reference_statistics(tmp_path):
    from pretrained import load_inception
    fx = golden("fid_inception.pt")
    sd = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}
    feats = ev.Features("inception", "cpu", net=load_inception(state_dict=sd, resize="pytorch_fid"))
    u8 = fx["inputs"]["u299"].permute(0, 2, 3, 1).numpy()                  # uint8 NHWC, as in an ADM .npz
    np.savez(tmp_path / "plain.npz", arr_0=u8)
    got = np.concatenate(list(ev.npz_batches(str(tmp_path / "plain.npz"), 3)))
    assert np.array_equal(got, u8)
    f = ev.extract(feats, ev.npz_batches(str(tmp_path / "plain.npz"), 3))
    np.testing.assert_allclose(f["pool"], fx["outputs"]["u299"]["block3_pooled"].double().numpy(), atol=1e-5, rtol=1e-4)
    assert f["spatial"].shape == (4, 2023) and f["logits"].shape == (4, 1008)
    # an ADM reference batch carries whole-dataset statistics: used as they are; P/R features come from arr_0
    mu, sigma = np.arange(2048.0), np.eye(2048)
    np.savez(tmp_path / "ref.npz", arr_0=u8, mu=mu, sigma=sigma, mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    ref = ev.reference_stats(str(tmp_path / "ref.npz"), feats, 2, 0, 1)
    assert np.array_equal(ref["mu"], mu) and np.array_equal(ref["sigma"], sigma) and ref["pr_feats"].shape == (4, 2048)
    ref2 = ev.reference_stats(str(tmp_path / "plain.npz"), feats, 2, 0, 1)  # computed, then cached beside it
    assert np.allclose(ref2["mu"], f["pool"].mean(0)) and os.path.exists(tmp_path / "plain.npz.inception-given.stats.npz")
    res = ev.generation_metrics(f, ref2)
    assert abs(res["fid"]) < 1e-3 and res["precision"] == 1.0 and "inception_score" in res and "sfid" in res


@pytest.fixture(scope="module")
def proxy_ckpt(tmp_path_factory):
    """A proxy trained briefly on an easy labeled .npz (dark vs bright noise images): it must learn it."""
    import proxy
    d = tmp_path_factory.mktemp("proxy")
    rng = np.random.default_rng(0)
    y = np.arange(256) % 2
    imgs = (rng.uniform(0, 120, (256, 32, 32, 3)) + 120 * y[:, None, None, None]).astype(np.uint8)
    np.savez(d / "easy.npz", arr_0=imgs, labels=y)
    out = str(d / "proxy.pt")
    proxy.main(["--data_path", str(d / "easy.npz"), "--steps", "40", "--batch_size", "32", "--num_workers", "0",
                "--width", "8", "--out", out])
    return out


def test_proxy_network_and_gen_cli(proxy_ckpt, tmp_path):
    from data import BuiltinSource
    from proxy import load_proxy
    ck = torch.load(proxy_ckpt, weights_only=True)
    assert ck["val_accuracy"] > 0.9 and ck["proxy_config"]["num_classes"] == 2
    net = load_proxy(proxy_ckpt)
    assert not net.training and net.features(torch.zeros(2, 3, 64, 64)).shape == (2, 256)  # resizes any input
    src = BuiltinSource(32, 60, "val")
    imgs = np.stack([np.asarray(src.load(i)) for i in range(60)])
    np.savez(tmp_path / "ref.npz", arr_0=imgs[:30], labels=np.array(src.labels[:30]))
    np.savez(tmp_path / "s.npz", arr_0=imgs[30:], labels=np.array(src.labels[30:]))
    res = ev.main(["gen", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
                   "--feature_net", "proxy", "--proxy_ckpt", proxy_ckpt, "--out", str(tmp_path / "r.json")])
    saved = json.load(open(tmp_path / "r.json"))
    assert {"proxy_fid", "proxy_precision", "proxy_recall", "class_accuracy"} <= set(saved) and "fid" not in saved
    assert res["proxy_fid"] >= 0 and 0 <= res["class_accuracy"] <= 1


def test_recon_and_latent_cli(proxy_ckpt, tmp_path):
    from dataclasses import asdict
    from tokenizer import MAETok, make_config
    from engine import save_checkpoint
    torch.manual_seed(0)
    tok = MAETok(make_config("tiny", aux_targets=(), enc_depth=1, dec_depth=1))
    path = str(tmp_path / "tok.pt")
    save_checkpoint({"model": tok.state_dict(), "ema": tok.state_dict(), "step": 0, "config": asdict(tok.cfg)}, path)
    res = ev.main(["recon", "--ckpt", path, "--num_images", "24", "--batch_size", "8", "--lpips", "0",
                   "--feature_net", "proxy", "--proxy_ckpt", proxy_ckpt])
    assert res["num_images"] == 24 and 0 < res["psnr"] < 60 and -1 <= res["ssim"] <= 1 and res["proxy_rfid"] > 0
    assert json.load(open(tmp_path / "recon-metrics.json"))["psnr"] == res["psnr"]  # default JSON beside the ckpt
    # class accuracy of the reconstructions = the proxy's own verdict on the uint8 reconstructions
    from data import BuiltinSource, ImageDataset, to_uint8
    from proxy import load_proxy
    ds = ImageDataset(BuiltinSource(32, 24, "val"), 32, train=False)
    x, y = torch.stack([ds[i][0] for i in range(24)]), torch.tensor([ds[i][1] for i in range(24)])
    with torch.no_grad():
        u8 = to_uint8(tok.decode(tok.encode(x)).clamp(-1, 1))
        pred = load_proxy(proxy_ckpt)(u8.permute(0, 3, 1, 2).float() / 127.5 - 1).argmax(1)
    assert res["class_accuracy"] == pytest.approx((pred == y).float().mean().item())
    res = ev.main(["latent", "--ckpt", path, "--num_images", "80", "--gmm_k", "1,2", "--out",
                   str(tmp_path / "lat.json")])
    assert 0 <= res["linear_probe_accuracy"] <= 1 and set(res["gmm_nll_per_dim"]) == {"1", "2"}
    assert json.load(open(tmp_path / "lat.json"))["gmm_pca_dim"] == res["gmm_pca_dim"]
    from PIL import Image
    assert Image.open(tmp_path / "lat-gmm.png").size == (420, 300)


def test_latent_probe_on_a_class_sorted_folder_is_held_out(tmp_path):
    """3 separable classes of 20 / 20 / 10 images: an 80 / 20 cut by index would test on class 2 only, which
    training never saw (0%); the stratified split tests on every class."""
    from dataclasses import asdict
    from engine import save_checkpoint
    from test_data import _class_sorted_folder
    from tokenizer import MAETok, make_config
    folder = _class_sorted_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    tok = MAETok(make_config("tiny", aux_targets=(), enc_depth=1, dec_depth=1))
    path = str(tmp_path / "tok.pt")
    save_checkpoint({"model": tok.state_dict(), "ema": tok.state_dict(), "step": 0, "config": asdict(tok.cfg)}, path)
    res = ev.main(["latent", "--ckpt", path, "--data_path", str(folder), "--num_images", "50", "--gmm_k", "1,2",
                   "--out", str(tmp_path / "lat.json")])
    assert (res["num_train"], res["num_test"]) == (40, 10) and res["linear_probe_accuracy"] >= 0.95


def test_unwritable_reference_cache_warns_and_keeps_the_statistics(tmp_path):
    from proxy import ProxyConfig, ProxyNet
    from test_data import _class_sorted_folder
    folder = str(_class_sorted_folder(tmp_path / "ref", sizes=(6, 6)))
    torch.manual_seed(0)
    feats = ev.Features("proxy", "cpu", net=ProxyNet(ProxyConfig(width=4, feature_dim=8)))
    os.makedirs(f"{folder}.{feats.id}.stats.npz.tmp.npz")  # the cache cannot be written (as a read-only folder)
    with pytest.warns(UserWarning, match="cannot write the reference statistics cache"):
        ref = ev.reference_stats(folder, feats, 4, 0, 1)
    assert ref["mu"].shape == (8,) and len(ref["pr_feats"]) == 12


@pytest.mark.slow
def test_recon_under_torchrun_equals_one_process(proxy_ckpt, tmp_path):
    import subprocess
    import sys
    from dataclasses import asdict
    from conftest import ROOT
    from tokenizer import MAETok, make_config
    from engine import save_checkpoint
    torch.manual_seed(0)
    tok = MAETok(make_config("tiny", aux_targets=(), enc_depth=1, dec_depth=1))
    path = str(tmp_path / "tok.pt")
    save_checkpoint({"model": tok.state_dict(), "ema": tok.state_dict(), "step": 0, "config": asdict(tok.cfg)}, path)
    args = ["recon", "--ckpt", path, "--num_images", "24", "--batch_size", "8", "--lpips", "0", "--feature_net",
            "proxy", "--proxy_ckpt", proxy_ckpt]
    one = ev.main(args)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29521",
                        "evaluate.py", *args, "--out", str(tmp_path / "two.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "two.json"))
    assert two["num_images"] == 24
    for k in ("psnr", "ssim", "proxy_rfid", "class_accuracy"):
        assert abs(two[k] - one[k]) < 1e-6 * max(1, abs(one[k])), (k, one[k], two[k])
    # gen: the features of both ranks reach rank 0 only, and the table equals one process's
    from data import BuiltinSource
    for name, split in (("s.npz", "train"), ("ref.npz", "val")):
        src = BuiltinSource(32, 30, split)
        np.savez(tmp_path / name, arr_0=np.stack([np.asarray(src.load(i)) for i in range(30)]),
                 labels=np.array(src.labels))
    args = ["gen", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--feature_net", "proxy",
            "--proxy_ckpt", proxy_ckpt, "--batch_size", "8"]
    one = ev.main(args + ["--out", str(tmp_path / "g1.json")])
    os.remove(next(str(p) for p in tmp_path.iterdir() if p.name.endswith(".stats.npz")))  # recompute under torchrun
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
                        "evaluate.py", *args, "--out", str(tmp_path / "g2.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "g2.json"))
    for k in ("proxy_fid", "proxy_precision", "proxy_recall", "class_accuracy"):
        assert abs(two[k] - one[k]) < 1e-6 * max(1, abs(one[k])), (k, one[k], two[k])
