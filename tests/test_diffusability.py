"""python evaluate.py diffusability on tiny untrained models: every metric is a finite number, the JSON and
the PNG are written, KL tokenizers get the posterior-sample variant, aligned MacTok tokens their footprints."""
import json
import math
from dataclasses import asdict

import pytest
import torch

import evaluate
from diffusion import DiT, make_config as dit_config
from engine import save_checkpoint
from proxy import ProxyConfig, ProxyNet
from tokenizer import build, make_config


def _finite(d):
    for k, v in d.items():
        if isinstance(v, float):
            assert math.isfinite(v), k


@pytest.mark.slow
def test_diffusability_report_of_a_tiny_mactok_with_a_denoiser(tmp_path):
    torch.manual_seed(0)
    tok = build(make_config("MacTok-tiny", align=("local", "global")))
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint({"model": tok.state_dict(), "ema": tok.state_dict(), "step": 0, "config": asdict(tok.cfg),
                     "args": {}}, str(tmp_path / "tok.pt"))
    proxy = ProxyNet(ProxyConfig(width=8))
    torch.save({"model": proxy.state_dict(), "proxy_config": asdict(proxy.cfg)}, tmp_path / "proxy.pt")
    L, C = tok.latent_shape
    dit = DiT(dit_config("tiny", in_channels=C, num_tokens=L, num_classes=10, width=64, depth=2))
    with torch.no_grad():  # off the zero inits, so that decodes and velocities are not constant
        for p in list(dit.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint({"model": dit.state_dict(), "ema": dit.state_dict(), "config": asdict(dit.cfg), "args": {},
                     "latent_stats": {"mean": torch.zeros(C), "std": torch.ones(C)}}, str(tmp_path / "dit.pt"))
    out = tmp_path / "d.json"
    common = ["--proxy_ckpt", str(tmp_path / "proxy.pt"), "--num_train", "200", "--num_val", "200",
              "--num_ifid", "60", "--tsne_points", "100", "--tsne_reps", "1", "--viv_samples", "16",
              "--num_trajectories", "8"]
    res = evaluate.main(["diffusability", "--tokenizer_ckpt", str(tmp_path / "tok.pt"), "--denoiser_ckpt",
                         str(tmp_path / "dit.pt"), "--out", str(out), *common])
    for k in ("viv", "viv_norm", "viv_marginal_norm", "lnc", "lnc_fg", "linear_probe_accuracy", "footprint_lds",
              "footprint_cds", "footprint_srss", "footprint_sec_0.5", "sec1d_0.5", "rmsc", "density_cv", "gini",
              "entropy", "proxy_ifid", "proxy_rfid", "eq_linear_r2_rot90", "eq_linear_r2_scale",
              "trajectory_local_straightness", "trajectory_global_efficiency"):
        assert isinstance(res[k], float), k
    _finite(res)
    _finite(res["posterior_sample"])
    assert res["footprints"] == [8, 4] and len(res["trajectory_segment_ratio"]) == 50
    assert json.load(open(out))["viv"] == res["viv"] and (tmp_path / "d.png").exists()
    # a second tokenizer plotted against the first
    evaluate.main(["diffusability", "--tokenizer_ckpt", str(tmp_path / "tok.pt"), "--posterior", "mean",
                   "--compare", str(out), "--out", str(tmp_path / "e.json"), *common])
    assert (tmp_path / "e.png").exists()


@pytest.mark.slow
def test_diffusability_of_a_grid_tokenizer_has_the_spatial_metrics(tmp_path):
    from aligntok import PRESETS, AlignTok, AlignTokConfig
    torch.manual_seed(0)
    tok = AlignTok(AlignTokConfig(**PRESETS["AlignTok-tiny"]))
    save_checkpoint({"model": tok.state_dict(), "ema": tok.state_dict(), "step": 0, "config": asdict(tok.cfg),
                     "args": {}}, str(tmp_path / "tok.pt"))
    proxy = ProxyNet(ProxyConfig(width=8))
    torch.save({"model": proxy.state_dict(), "proxy_config": asdict(proxy.cfg)}, tmp_path / "proxy.pt")
    res = evaluate.main(["diffusability", "--tokenizer_ckpt", str(tmp_path / "tok.pt"), "--proxy_ckpt",
                         str(tmp_path / "proxy.pt"), "--num_train", "100", "--num_val", "100", "--num_ifid", "40",
                         "--tsne_points", "60", "--tsne_reps", "1", "--viv_samples", "8", "--out", str(tmp_path / "g.json")])
    assert res["grid"] == [8, 8] and res["footprints"] is None and "posterior_sample" not in res
    for k in ("lds", "cds", "srss", "rmsc", "sec_0.5", "lnc_fg", "eq_err_rot90", "eq_err_scale", "eq_cos_rot90"):
        assert isinstance(res[k], float) and math.isfinite(res[k]), k
