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


def test_lnc_in_row_blocks_equals_the_dense_form():
    import latent_metrics as lm
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 7
    f = torch.randn(300, 24, generator=g, dtype=torch.float64) + 0.8 * torch.randn(7, 24, generator=g,
                                                                                  dtype=torch.float64)[y]
    u = torch.nn.functional.normalize(f, dim=1)
    sim = (u @ u.T).fill_diagonal_(-float("inf"))                           # the dense N x N definition
    dense = (y[sim.topk(10, dim=1).indices] == y[:, None]).double().mean().item()
    assert abs(lm.lnc(f, y, 10) - dense) < 1e-12 and abs(lm.lnc(f, y, 10, block=7) - dense) < 1e-12
    assert 0.3 < dense < 1


def test_features_stay_fp32_under_a_callers_bf16_autocast():
    net = ProxyNet(ProxyConfig(width=8))
    feats = evaluate.Features("proxy", torch.device("cpu"), net=net)
    u8 = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8).numpy()
    ref = feats(u8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = feats(u8)
    assert all((got[k] == ref[k]).all() for k in ref)


def _tiny_mactok(path):
    torch.manual_seed(0)
    tok = build(make_config("MacTok-tiny", enc_depth=1, dec_depth=1))
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint({"model": tok.state_dict(), "ema": tok.state_dict(), "step": 0, "config": asdict(tok.cfg),
                     "args": {}}, str(path / "tok.pt"))
    proxy = ProxyNet(ProxyConfig(width=8))
    torch.save({"model": proxy.state_dict(), "proxy_config": asdict(proxy.cfg)}, path / "proxy.pt")
    return ["--tokenizer_ckpt", str(path / "tok.pt"), "--proxy_ckpt", str(path / "proxy.pt"), "--num_train", "100",
            "--num_val", "100", "--tsne_points", "50", "--tsne_reps", "1", "--viv_samples", "8"]


def test_num_ifid_zero_skips_the_decoded_metrics(tmp_path):
    res = evaluate.main(["diffusability", *_tiny_mactok(tmp_path), "--num_ifid", "0", "--posterior", "mean",
                         "--out", str(tmp_path / "d.json")])
    assert isinstance(res["lnc"], float) and "proxy_ifid" not in res and "eq_linear_r2_rot90" not in res


@pytest.mark.slow
def test_two_ranks_finish_while_rank_zero_measures_slowly_and_equal_one_rank(tmp_path):
    """Every variant of every tokenizer is encoded on every rank before rank 0 measures: with a 3 s process-group
    timeout and rank 0's first measurement taking 6 s, no rank waits in a collective (the old order timed out in
    the second variant's or tokenizer's gather). The posterior-mean metrics equal one process's."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    common = _tiny_mactok(tmp_path) + ["--num_ifid", "20"]
    one = evaluate.main(["diffusability", *common, "--out", str(tmp_path / "one.json")])
    wrapper = tmp_path / "slow_evaluate.py"
    wrapper.write_text(f"""import datetime, sys, time
sys.path.insert(0, {str(ROOT)!r})
import torch.distributed as dist
init = dist.init_process_group
dist.init_process_group = lambda *a, **k: init(*a, **{{**k, "timeout": datetime.timedelta(seconds=3)}})
import diffusability
real, calls = diffusability.diffusability_metrics, []
def slow(*a, **k):
    calls.append(1)
    if len(calls) == 1:
        time.sleep(6)
    return real(*a, **k)
diffusability.diffusability_metrics = slow
import evaluate
evaluate.main(sys.argv[1:])
""")
    i = common.index("--tokenizer_ckpt") + 1
    twice = common[:i] + [f"{common[i]},{common[i]}"] + common[i + 1:]      # two tokenizers: a table of two
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        str(wrapper), "diffusability", *twice, "--out", str(tmp_path / "two.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    both = json.load(open(tmp_path / "two.json"))
    assert len(both) == 2 and (tmp_path / "two.md").exists()
    two = both[1]
    assert "posterior_sample" in two
    for k in ("viv_norm", "lnc", "rmsc", "sec1d_0.5", "proxy_rfid"):
        assert abs(two[k] - one[k]) < 1e-5 * max(1, abs(one[k])), (k, one[k], two[k])


def test_features_run_without_tf32_whatever_the_global_flag():
    net = ProxyNet(ProxyConfig(width=8))
    feats = evaluate.Features("proxy", torch.device("cpu"), net=net)
    seen, real = [], feats.features
    feats.features = lambda u8: seen.append(torch.backends.cuda.matmul.allow_tf32) or real(u8)
    flags = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        feats(torch.zeros(2, 32, 32, 3, dtype=torch.uint8).numpy())
        assert seen == [False] and torch.backends.cuda.matmul.allow_tf32     # off inside, restored after
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flags
