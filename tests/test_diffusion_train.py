"""The latent pipeline end to end on CPU: tokenizer checkpoint -> latent cache -> train_diffusion.py -> sample.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cache_latents
import sample
import train_diffusion
from conftest import ROOT
from data import BuiltinSource, ImageDataset, LatentCache
from diffusion import DiT, DiTConfig, guided_velocity
from tokenizer import MAETok, make_config
from engine import find_checkpoint, save_checkpoint

BASE = ["--model", "tiny", "--global_batch_size", "8", "--lr", "1e-3", "--log_every", "1", "--grid_every", "-1",
        "--ema_decay", "0.9", "--num_workers", "0"]


@pytest.fixture(scope="module")
def tok_ckpt(tmp_path_factory):
    """A small (untrained) tokenizer saved as train_tokenizer.py would: enough to test the plumbing."""
    torch.manual_seed(0)
    model = MAETok(make_config("tiny", aux_targets=(), enc_depth=1, dec_depth=1))
    path = str(tmp_path_factory.mktemp("tok") / "tok.pt")
    from dataclasses import asdict
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "step": 0,
                     "config": asdict(model.cfg), "args": {}}, path)
    return path


@pytest.fixture(scope="module")
def cache(tok_ckpt, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache") / "c")
    cache_latents.main(["--tokenizer_ckpt", tok_ckpt, "--cache_path", path, "--builtin_size", "40",
                        "--batch_size", "16", "--shard_size", "16", "--num_workers", "0"])
    return path


def test_cache_round_trip_and_statistics(tok_ckpt, cache):
    from tokenizer import from_checkpoint
    tok = from_checkpoint(torch.load(tok_ckpt, weights_only=True))
    c = LatentCache(cache)
    assert len(c) == 40 and len(c.meta["shards"]) == 3 and c.meta["latent_shape"] == [32, 8]
    ds = ImageDataset(BuiltinSource(32, 40), 32, train=False)
    x = torch.stack([ds[i][0] for i in range(40)])
    with torch.no_grad():
        z, zf = tok.encode(x), tok.encode(x.flip(-1))
    plain = torch.stack([s["latents"][c.row_of[i]] for i, s in ((i, c.shards[c.shard_of[i]]) for i in range(40))])
    flip = torch.stack([s["latents_flip"][c.row_of[i]] for i, s in ((i, c.shards[c.shard_of[i]]) for i in range(40))])
    assert plain.dtype == flip.dtype == torch.float32 and c.meta["dtype"] == "float32"  # the default: fp32 storage
    torch.testing.assert_close(plain, z, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(flip, zf, atol=1e-6, rtol=1e-5)
    assert c.labels == [i % 10 for i in range(40)]
    zz = z.reshape(-1, 8).double()
    torch.testing.assert_close(c.mean, zz.mean(0).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.std, zz.std(0).float(), atol=1e-5, rtol=1e-5)
    # each item is one of the two versions, by a coin fixed by (seed, epoch, index); both occur
    picks = [torch.equal(c[(i, 0)][0], z_i) for i, z_i in enumerate(plain.float())]
    assert 0 < sum(picks) < 40 and [c[(i, 0)][0].sum() for i in range(5)] == [c[(i, 0)][0].sum() for i in range(5)]


def test_cache_mismatch_is_a_clear_error(cache):
    c = LatentCache(cache)
    with pytest.raises(ValueError, match=r"holds \(32, 8\) latents but the model expects \(16, 8\)"):
        c.check(num_tokens=16, in_channels=8)
    with pytest.raises(ValueError, match=r"another tokenizer .*latent_dim"):
        c.check(tokenizer_config={**c.meta["tokenizer_config"], "latent_dim": 4})
    with pytest.raises(FileNotFoundError, match="no meta.json: build the cache first"):
        LatentCache(os.path.dirname(cache))


def _metrics(run):
    return [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]


def test_diffusion_resume_equals_uninterrupted_run(cache, tmp_path):
    # 40 latents / batch 8 = 5 steps per epoch: the resumed stretch crosses an epoch boundary
    full = train_diffusion.main(BASE + ["--cache_path", cache, "--max_steps", "7", "--results_dir", str(tmp_path / "a")])
    half = train_diffusion.main(BASE + ["--cache_path", cache, "--max_steps", "3", "--results_dir", str(tmp_path / "b")])
    train_diffusion.main(BASE + ["--resume", half, "--max_steps", "7"])
    a, b = _metrics(full), _metrics(half)
    assert [r["step"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a, b):
        for k in ("loss", "mse", "grad_norm"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])  # bitwise on CPU fp32
    ca = torch.load(os.path.join(full, "checkpoints", "0000007.pt"), weights_only=True)
    cb = torch.load(os.path.join(half, "checkpoints", "0000007.pt"), weights_only=True)
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])
    assert {"latent_stats", "tokenizer_config", "tokenizer_ckpt", "config"} <= set(ca)


def test_lightning_recipe_and_on_the_fly_encoding(tok_ckpt, tmp_path):
    run = train_diffusion.main(["--model", "tiny", "--tokenizer_ckpt", tok_ckpt, "--builtin_size", "16",
                                "--stats_images", "16", "--global_batch_size", "8", "--lr", "1e-3",
                                "--time_dist", "logit_normal", "--cosine_loss", "1", "--max_steps", "2",
                                "--log_every", "1", "--grid_every", "2", "--grid_steps", "2", "--num_workers", "0",
                                "--results_dir", str(tmp_path)])
    rec = _metrics(run)[-1]
    assert rec["cos"] > 0 and abs(rec["loss"] - rec["mse"] - rec["cos"]) < 1e-5
    assert os.path.exists(os.path.join(run, "grids", "0000002.png"))
    args, _ = train_diffusion.resolve_flags(*train_diffusion.parse_args(["--model", "LightningDiT-XL",
                                                                         "--cache_path", "x"]))
    assert (args.lr, args.beta2, args.global_batch_size, args.time_dist, args.cosine_loss) == \
        (2e-4, 0.95, 1024, "logit_normal", True)
    args, _ = train_diffusion.resolve_flags(*train_diffusion.parse_args(["--model", "SiT-XL", "--cache_path",
                                                                         "x"]))
    assert (args.lr, args.weight_decay, args.global_batch_size, args.time_dist, args.cosine_loss) == \
        (1e-4, 0.0, 256, "uniform", False)


def test_unconditional_model_trains_and_samples_without_labels(cache, tmp_path):
    run = train_diffusion.main(BASE + ["--cache_path", cache, "--unconditional", "--max_steps", "2",
                                       "--results_dir", str(tmp_path)])
    ck = torch.load(find_checkpoint(run), weights_only=True)
    assert ck["config"]["num_classes"] == 0 and not any(k.startswith("y_embedder") for k in ck["ema"])
    model = DiT(DiTConfig(**ck["config"])).eval()
    model.load_state_dict(ck["ema"])
    x, t = torch.randn(4, 32, 8), torch.rand(4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, torch.tensor([0, 1, 2, 3])), model(x, t, None))
        v1, v4 = guided_velocity(model, None, 1.0)(x, 0.5), guided_velocity(model, None, 4.0)(x, 0.5)
    assert torch.equal(v1, v4)                                            # no classes: CFG is a no-op
    sample.main(["--ckpt", run, "--num_samples", "6", "--batch_size", "3", "--num_steps", "2", "--cfg_scale", "4",
                 "--out", str(tmp_path / "u.npz")])
    f = np.load(tmp_path / "u.npz")
    assert f["arr_0"].shape == (6, 32, 32, 3) and f["labels"].tolist() == [0] * 6


@pytest.fixture(scope="module")
def diff_run(cache, tmp_path_factory):
    return train_diffusion.main(BASE + ["--cache_path", cache, "--max_steps", "2", "--results_dir",
                                        str(tmp_path_factory.mktemp("d"))])


def test_sample_grid_and_npz_format(diff_run, tmp_path):
    sample.main(["--ckpt", diff_run, "--classes", "0,3", "--seeds", "1,2,3", "--num_steps", "3",
                 "--out", str(tmp_path / "g.png")])
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (3 * 34 + 2, 2 * 34 + 2)  # 3 seeds x 2 classes, 2 px gaps
    sample.main(["--ckpt", diff_run, "--num_samples", "25", "--batch_size", "8", "--num_steps", "3",
                 "--sampler", "sde", "--cfg_scale", "2", "--out", str(tmp_path / "s.npz")])
    f = np.load(tmp_path / "s.npz")
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (25, 32, 32, 3)
    assert np.array_equal(f["labels"], np.arange(25) % 10)                # balanced: i mod K
    # the same seed gives the same image whatever the batch size
    sample.main(["--ckpt", diff_run, "--num_samples", "25", "--batch_size", "5", "--num_steps", "3",
                 "--sampler", "sde", "--cfg_scale", "2", "--out", str(tmp_path / "s2.npz")])
    assert np.array_equal(np.load(tmp_path / "s2.npz")["arr_0"], f["arr_0"])
    assert not [p for p in os.listdir(tmp_path) if ".part" in p or ".tmp" in p]


@pytest.mark.parametrize("args,msg", [
    (["--guidance_interval", "0.8,0.2"], "--guidance_interval"),
    (["--sampler", "dopri"], "invalid choice: 'dopri'"),
    (["--num_steps", "0"], "--num_steps"),
])
def test_sample_bad_flags(args, msg):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", "x", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr


@pytest.mark.slow
def test_torchrun_sampling_equals_one_process(diff_run, tmp_path):
    common = ["sample.py", "--ckpt", diff_run, "--num_samples", "12", "--batch_size", "4", "--num_steps", "3",
              "--sampler", "sde", "--labels", "uniform"]
    one = tmp_path / "one.npz"
    sample.main(common[1:] + ["--out", str(one)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519", *common,
           "--out", str(tmp_path / "two.npz")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = np.load(one), np.load(tmp_path / "two.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


@pytest.mark.slow
def test_torchrun_cache_equals_one_process_and_ddp_training_runs(tok_ckpt, cache, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = str(tmp_path / "c2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
           "cache_latents.py", "--tokenizer_ckpt", tok_ckpt, "--cache_path", two, "--builtin_size", "40",
           "--batch_size", "16", "--shard_size", "16", "--num_workers", "0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = LatentCache(cache), LatentCache(two)
    assert len(b.meta["shards"]) == 4 and b.labels == a.labels  # each rank wrote 16 + 4 of its 20 images
    for key in ("latents", "latents_flip"):                     # same latent for the same image index
        za, zb = ([c.shards[c.shard_of[i]][key][c.row_of[i]] for i in range(40)] for c in (a, b))
        torch.testing.assert_close(torch.stack(zb).float(), torch.stack(za).float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(b.mean, a.mean, atol=1e-5, rtol=1e-5)  # moments all-reduced over ranks
    torch.testing.assert_close(b.std, a.std, atol=1e-5, rtol=1e-5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29525",
           "train_diffusion.py", *BASE, "--cache_path", two, "--max_steps", "3", "--results_dir", str(tmp_path / "d")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = str(next((tmp_path / "d").iterdir()))
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]
    ck = torch.load(os.path.join(run, "checkpoints", "0000003.pt"), weights_only=True)
    assert len(ck["rng"]) == 2 and "2 ranks x 4" in open(os.path.join(run, "log.txt")).read()
