"""train_tokenizer.py end to end on CPU: checkpoints, exact resume, stage 2, flags, DDP smoke."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_tokenizer
from conftest import ROOT
from maetok import MAETok, TokenizerConfig

BASE = ["--preset", "tiny", "--global_batch_size", "8", "--lr", "1e-3", "--warmup_steps", "2",
        "--perceptual_weight", "0", "--builtin_size", "40", "--num_workers", "0", "--log_every", "1",
        "--eval_every", "-1", "--grid_every", "-1", "--ema_decay", "0.9"]


def metrics(run):
    return [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]


def test_checkpoint_round_trip(tmp_path):
    run = train_tokenizer.main(BASE + ["--max_steps", "2", "--results_dir", str(tmp_path),
                                       "--grid_every", "2", "--eval_every", "2", "--eval_images", "8"])
    path = os.path.join(run, "checkpoints", "0000002.pt")
    ck = torch.load(path, weights_only=True)  # plain values and tensors only
    assert {"model", "ema", "optimizer", "step", "config", "args", "rng"} <= set(ck) and ck["step"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    model = MAETok(TokenizerConfig(**ck["config"])).eval()
    model.load_state_dict(ck["ema"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x)["rec"].shape == x.shape
    assert os.path.exists(os.path.join(run, "grids", "0000002.png"))
    log = open(os.path.join(run, "log.txt")).read()
    assert "parameters: encoder" in log and "held-out PSNR" in log
    rec = metrics(run)[0]
    assert {"step", "pixel", "hog", "loss", "lr", "grad_norm", "img_per_s"} <= set(rec)


def test_resume_equals_uninterrupted_run(tmp_path):
    # 40 images / batch 8 = 5 steps per epoch: the resumed stretch crosses an epoch boundary
    # the stopped run planned its schedule to step 7 (--decay_steps), as a run killed at step 3 would have
    full = train_tokenizer.main(BASE + ["--max_steps", "7", "--results_dir", str(tmp_path / "a")])
    half = train_tokenizer.main(BASE + ["--max_steps", "3", "--decay_steps", "7", "--results_dir", str(tmp_path / "b")])
    train_tokenizer.main(BASE + ["--max_steps", "7", "--resume", half])
    a, b = metrics(full), metrics(half)
    assert [r["step"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a, b):
        for k in ("loss", "pixel", "hog", "grad_norm", "lr"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])  # bitwise on CPU fp32
    ca = torch.load(os.path.join(full, "checkpoints", "0000007.pt"), weights_only=True)
    cb = torch.load(os.path.join(half, "checkpoints", "0000007.pt"), weights_only=True)
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])


def test_extending_max_steps_keeps_the_planned_schedule_and_old_checkpoints_resume(tmp_path):
    short = train_tokenizer.main(BASE + ["--max_steps", "5", "--results_dir", str(tmp_path)])
    path = os.path.join(short, "checkpoints", "0000005.pt")
    ck = torch.load(path, weights_only=True)
    for k in ("decay_steps", "val_data_path", "eval_images"):  # a checkpoint written before these flags existed
        del ck["args"][k]
    torch.save(ck, path)
    train_tokenizer.main(BASE + ["--max_steps", "7", "--resume", short, "--lr", "5"])  # --lr: ignored, and said
    m = metrics(short)
    floor = 1e-3 * 0.1
    assert [r["step"] for r in m] == list(range(1, 8)) and m[4]["lr"] > floor
    assert [r["lr"] for r in m[5:]] == [floor, floor]  # the cosine planned to step 5 is not stretched
    log = open(os.path.join(short, "log.txt")).read()
    assert "steps 5-7 stay at that floor (pass --decay_steps to re-plan)" in log
    assert "resume: ignored --lr" in log
    ck = torch.load(os.path.join(short, "checkpoints", "0000007.pt"), weights_only=True)
    assert ck["args"]["decay_steps"] == 5 and ck["args"]["eval_images"] == 500 and ck["args"]["lr"] == 1e-3


def test_decoder_finetune_freezes_encoder_and_drops_aux(tmp_path):
    stage1 = train_tokenizer.main(BASE + ["--max_steps", "2", "--results_dir", str(tmp_path)])
    run = train_tokenizer.main(BASE + ["--max_steps", "3", "--results_dir", str(tmp_path), "--stage",
                                       "decoder_finetune", "--init_from", stage1, "--mask_anneal_steps", "2"])
    s1 = torch.load(os.path.join(stage1, "checkpoints", "0000002.pt"), weights_only=True)["ema"]
    s2 = torch.load(os.path.join(run, "checkpoints", "0000003.pt"), weights_only=True)
    assert not any(k.startswith("aux.") for k in s2["model"]) and tuple(s2["config"]["aux_targets"]) == ()
    enc = [k for k in s2["model"] if k.startswith("encoder.")]
    assert enc and all(torch.equal(s2["model"][k], s1[k]) for k in enc)  # frozen: encoder + latent tokens
    dec = [k for k in s2["model"] if k.startswith("decoder.")]
    assert any(not torch.equal(s2["model"][k], s1[k]) for k in dec)  # the pixel decoder trains
    assert [r["mask_ratio"] for r in metrics(run)] == [0.6, 0.3, 0.0]  # linear 0.6 -> 0
    # named after the preset it fine-tunes, with that stage's recipe (full LPIPS weight from step 0)
    assert os.path.basename(run).endswith("MAETok-tiny-decoder_finetune") and s2["args"]["preset"] == "tiny"
    assert s2["args"]["perceptual_warmup"] == 0 and s2["args"]["stage"] == "decoder_finetune"
    assert all(set(r) >= {"pixel"} and "hog" not in r for r in metrics(run))


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "train_tokenizer.py", *args], cwd=ROOT, capture_output=True,
                          text=True, **kw)


@pytest.mark.parametrize("args,msg", [
    (["--mask_ratio", "1.5"], "--mask_ratio"),
    (["--mask-ratio", "0.5"], "unrecognized arguments: --mask-ratio"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--stage", "decoder_finetune"], "needs --init_from"),
])
def test_bad_flags_are_rejected_clearly(args, msg):
    r = _cli(*args)
    assert r.returncode == 2 and msg in r.stderr


def test_missing_data_and_bad_checkpoint_are_clear_errors(tmp_path):
    r = _cli("--preset", "tiny", "--data_path", str(tmp_path / "nope"), "--results_dir", str(tmp_path))
    assert r.returncode != 0 and "is not a folder" in r.stderr
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    r = _cli("--resume", str(tmp_path / "bad.pt"))
    assert r.returncode != 0 and "cannot read checkpoint" in r.stderr


def test_corrupt_image_in_training_data_is_skipped_and_counted(tmp_path):
    from test_data import _write_folder
    _write_folder(tmp_path / "imgs")
    run = train_tokenizer.main(BASE + [
        "--data_path", str(tmp_path / "imgs"), "--max_steps", "2", "--results_dir", str(tmp_path)])
    assert sum(r["skipped_images"] for r in metrics(run)) >= 1


def test_preset_brings_its_recipe_and_explicit_flags_win():
    import engine
    p, args, explicit = train_tokenizer.parse_args(["--preset", "tiny", "--lr", "5e-4"])
    engine.apply_recipe(args, train_tokenizer.RECIPES["tiny"]["main"], explicit)
    assert (args.global_batch_size, args.lr, args.warmup_steps, args.max_steps, args.ema_decay) == \
        (32, 5e-4, 100, 1300, 0.99)
    p, args, explicit = train_tokenizer.parse_args([])  # the paper's run
    assert (args.global_batch_size, args.lr, args.warmup_steps, args.max_steps) == (512, 2e-4, 5000, 500_000)
    assert train_tokenizer.RECIPES["MAETok-B-128"]["decoder_finetune"]["max_steps"] == 50_000


def test_a_global_batch_smaller_than_the_world_is_a_clear_error():
    import engine
    with pytest.raises(SystemExit, match="smaller than the world size 4"):
        engine.micro_batching(2, None, 4)
    assert engine.micro_batching(64, 8, 2) == (8, 4)


@pytest.mark.slow
def test_torchrun_two_process_cpu_smoke(tmp_path, disc_proxy):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "train_tokenizer.py", *BASE, "--max_steps", "3", "--results_dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    run = next(Path(tmp_path).iterdir())
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    ck = torch.load(run / "checkpoints" / "0000003.pt", weights_only=True)
    assert len(ck["rng"]) == 2 and "2 ranks x 4" in (run / "log.txt").read_text()
    # DDP with masking off: the aux decoders would get no gradient; a clear error instead of a DDP crash
    r = subprocess.run(cmd[:-2] + ["--results_dir", str(tmp_path / "nomask"), "--mask_ratio", "0",
                                   "--mask_ratio_min", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "aux decoders get no gradient" in r.stderr
    # the GAN under DDP (gloo): heads in their own DDP, BatchNorm per rank, LeCAM EMAs all-reduced
    r = subprocess.run(cmd[:-2] + ["--results_dir", str(tmp_path / "gan"), *disc_proxy, "--disc_start", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    run = next(Path(tmp_path / "gan").iterdir())
    m = metrics(run)
    assert "d_loss" not in m[0] and all(math.isfinite(r["d_loss"]) and r["d_weight"] > 0 for r in m[1:])
    assert "BatchNorm per rank under gloo" in (run / "log.txt").read_text()


@pytest.mark.slow
def test_resume_on_another_number_of_ranks_keeps_the_global_batch_and_distinct_streams(tmp_path):
    """2 ranks for 2 steps, resumed on 3 ranks and on 1: the global batch stays 12 (micro-batch and accumulation
    re-planned from the per-rank batch the run had), and the joining rank draws its own stream, not rank 0's."""
    import shutil
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train_tokenizer.py", *BASE, "--global_batch_size", "12", "--builtin_size", "48"]

    def launch(n, *extra):
        pre = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port=29531"] \
            if n > 1 else [sys.executable]
        r = subprocess.run(pre + args + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]

    launch(2, "--max_steps", "2", "--results_dir", str(tmp_path / "a"))
    run = next((tmp_path / "a").iterdir())
    shutil.copytree(run, tmp_path / "b")
    launch(3, "--max_steps", "3", "--resume", str(run))
    launch(1, "--max_steps", "3", "--resume", str(tmp_path / "b"))
    for folder, plan, n in ((run, "12 = 3 ranks x 4 x 1 accum", 3), (tmp_path / "b", "12 = 1 ranks x 6 x 2 accum", 1)):
        log = (folder / "log.txt").read_text()
        assert plan in log and "2 ranks x 6 x 1 accum" in log and "checkpoint saved with 2 ranks" in log
        ck = torch.load(folder / "checkpoints" / "0000003.pt", weights_only=True)
        states = [s["torch"] for s in ck["rng"]]
        assert len(states) == n and ck["args"]["global_batch_size"] == 12
        assert all(not torch.equal(states[i], states[j]) for i in range(n) for j in range(i))
        assert [m["step"] for m in metrics(folder)] == [1, 2, 3]


def test_a_nonfinite_step_is_skipped_and_a_streak_stops_the_run_with_the_last_checkpoint_intact(tmp_path,
                                                                                                monkeypatch):
    real, calls, bad = train_tokenizer.generator_loss, [], {2}

    def poisoned(*a, **k):  # a NaN loss on the chosen micro-batches (one per step here)
        out = real(*a, **k)
        calls.append(1)
        if len(calls) in bad:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_tokenizer, "generator_loss", poisoned)
    run = train_tokenizer.main(BASE + ["--max_steps", "3", "--results_dir", str(tmp_path / "a"), "--ckpt_every", "1",
                                       "--keep_checkpoints", "0"])
    c1, c2, c3 = (torch.load(os.path.join(run, "checkpoints", f"000000{i}.pt"), weights_only=True) for i in (1, 2, 3))
    for part in ("model", "ema"):  # step 2 skipped: weights, EMA and optimizer moments are step 1's
        assert all(torch.equal(c1[part][k], c2[part][k]) for k in c1[part])
        assert all(torch.isfinite(v).all() for v in c3[part].values() if v.is_floating_point())
        assert not all(torch.equal(c2[part][k], c3[part][k]) for k in c2[part])  # step 3 trains again
    s1, s2 = c1["optimizer"]["state"], c2["optimizer"]["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) and s1[i]["step"] == s2[i]["step"] for i in s1)
    assert [m["nonfinite_steps"] for m in metrics(run)] == [0, 1, 0]
    assert "step 2: non-finite gradient norm" in open(os.path.join(run, "log.txt")).read()
    calls.clear()
    bad = set(range(2, 100))
    with pytest.raises(SystemExit, match="2 consecutive steps with a non-finite"):
        train_tokenizer.main(BASE + ["--max_steps", "6", "--results_dir", str(tmp_path / "b"), "--ckpt_every", "1",
                                     "--nonfinite_patience", "2"])
    ckpts = sorted((tmp_path / "b").glob("*/checkpoints/*.pt"))
    assert [c.name for c in ckpts] == ["0000001.pt", "0000002.pt"]      # written before the streak ended the run
    c = torch.load(ckpts[-1], weights_only=True)
    assert torch.equal(c["model"]["decoder.head.weight"],
                       torch.load(ckpts[0], weights_only=True)["model"]["decoder.head.weight"])


@pytest.mark.slow
def test_a_folder_that_ranks_do_not_share_stops_every_rank_at_start(tmp_path):
    """Node-local disks, simulated: each rank is given its own folder. Every rank exits with the message before
    any work; a shared folder passes and leaves no token behind."""
    script = tmp_path / "check.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import torch
import engine
ddp, rank, world, _, _ = engine.setup_distributed()
engine.check_shared_folder({str(tmp_path)!r} + (f"/rank{{rank}}" if sys.argv[1] == "local" else "/shared"), rank, world,
                           "--results_dir")
print("passed", rank)
torch.distributed.destroy_process_group()  # a live gloo group can abort the process at exit
""")
    for mode in ("shared", "local"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29543",
                            str(script), mode], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        if mode == "shared":
            assert r.returncode == 0 and r.stdout.count("passed") == 2, r.stderr[-2000:]
            assert os.listdir(tmp_path / "shared") == []
        else:
            assert r.returncode != 0 and "passed" not in r.stdout
            assert "is not shared: rank 1 on" in r.stderr and "filesystem mounted on every node" in r.stderr


def test_compile_wraps_the_ddp_module_and_precision_decides_tf32(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import engine
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:  # DDP inside, compile outside: the all-reduce can overlap the compiled backward
        fwd = engine.wrap_model(torch.nn.Linear(2, 2), True, True, torch.device("cpu"), 0)
        assert isinstance(fwd, torch._dynamo.eval_frame.OptimizedModule) and isinstance(fwd._orig_mod, DDP)
        with fwd.no_sync():  # what gradient accumulation calls
            pass
    finally:
        dist.destroy_process_group()
    try:
        for flag, tf32 in (("fp32", False), ("tf32", True), ("bf16", True), ("fp32", False)):
            precision, _ = engine.autocast_context(flag, torch.device("cuda"))
            assert precision == flag and torch.backends.cuda.matmul.allow_tf32 is tf32
            assert torch.backends.cudnn.allow_tf32 is tf32
    finally:
        engine.autocast_context("fp32", torch.device("cpu"))


def test_perceptual_term_with_local_vgg(tmp_path):
    from pretrained import VGG16Features
    torch.save(VGG16Features().state_dict(), tmp_path / "vgg16.pth")  # official key layout, features.*
    run = train_tokenizer.main(BASE + ["--max_steps", "2", "--results_dir", str(tmp_path), "--perceptual_weight",
                                       "1", "--perceptual_warmup", "0", "--vgg_ckpt", str(tmp_path / "vgg16.pth")])
    rec = metrics(run)[-1]
    assert rec["lpips"] > 0 and abs(rec["loss"] - rec["pixel"] - rec["hog"] - rec["lpips"]) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# the GAN (discriminator.py): a random-weight proxy CNN stands in for the DINO trunk

@pytest.fixture
def disc_proxy(tmp_path_factory):
    from dataclasses import asdict
    from proxy import ProxyConfig, ProxyNet
    torch.manual_seed(1)
    net = ProxyNet(ProxyConfig(32, 10, width=4))
    path = tmp_path_factory.mktemp("disc") / "disc_proxy.pt"
    torch.save({"model": net.state_dict(), "proxy_config": asdict(net.cfg), "val_accuracy": 0.0}, path)
    return ["--disc", "proxy", "--disc_proxy_ckpt", str(path)]


def test_gan_resume_is_exact_across_disc_start(tmp_path, disc_proxy):
    gan = BASE + disc_proxy + ["--disc_start", "2", "--micro_batch_size", "4"]  # 2 micro-batches for G and D
    full = train_tokenizer.main(gan + ["--max_steps", "6", "--results_dir", str(tmp_path / "a")])
    half = train_tokenizer.main(gan + ["--max_steps", "1", "--decay_steps", "6", "--results_dir", str(tmp_path / "b")])
    train_tokenizer.main(gan + ["--max_steps", "4", "--resume", half])      # stops after disc_start too
    train_tokenizer.main(gan + ["--max_steps", "6", "--resume", half])
    a, b = metrics(full), metrics(half)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert "d_loss" not in a[1] and {"d_loss", "g_loss", "d_weight", "d_hinge", "d_lecam", "d_cr", "logits_real",
                                     "logits_fake", "d_grad_norm"} <= set(a[2])  # 0-based step 2 = the 3rd
    for ra, rb in zip(a, b):
        for k in set(ra) - {"img_per_s"}:
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])              # bitwise on CPU fp32
    ca = torch.load(os.path.join(full, "checkpoints", "0000006.pt"), weights_only=True)
    cb = torch.load(os.path.join(half, "checkpoints", "0000006.pt"), weights_only=True)
    assert ca["lecam"] == cb["lecam"] and ca["lecam"]["real"] != 0           # the LeCAM EMAs are kept
    assert all(torch.equal(ca["disc"][k], cb["disc"][k]) for k in ca["disc"])  # heads, SN vectors, BN stats
    assert any(k.endswith("weight_u") for k in ca["disc"]) and not any("net." in k for k in ca["disc"])
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])
    assert ca["disc_optimizer"]["state"]


def test_gan_in_stage_two_is_on_from_the_first_step(tmp_path, disc_proxy):
    stage1 = train_tokenizer.main(BASE + disc_proxy + ["--disc_start", "1", "--max_steps", "2",
                                                       "--results_dir", str(tmp_path)])
    run = train_tokenizer.main(BASE + disc_proxy + ["--max_steps", "1", "--results_dir", str(tmp_path), "--stage",
                                                    "decoder_finetune", "--init_from", stage1])
    s1 = torch.load(os.path.join(stage1, "checkpoints", "0000002.pt"), weights_only=True)
    rec = metrics(run)[0]
    assert rec["step"] == 1 and rec["d_weight"] > 0 and "d_loss" in rec
    assert "GAN: proxy discriminator" in open(os.path.join(run, "log.txt")).read()
    s2 = torch.load(os.path.join(run, "checkpoints", "0000001.pt"), weights_only=True)
    n = [ck["disc"]["heads.0.0.1.num_batches_tracked"].item() for ck in (s1, s2)]
    assert s2["args"]["disc_start"] == 0 and n == [5, 10]  # 5 D passes per step; stage 2 continues stage 1's D


def test_missing_teacher_and_discriminator_weights_are_clear_errors(tmp_path, offline):
    with pytest.raises(SystemExit, match=r"dino_deitsmall16_pretrain\.pth.*--dino_ckpt.*--disc none"):
        train_tokenizer.main(BASE + ["--disc", "dino", "--max_steps", "1", "--results_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"open_clip_pytorch_model\.bin from https://huggingface\.co/timm/"
                                         r"ViT-SO400M-14-SigLIP.*--siglip_ckpt"):
        train_tokenizer.main(BASE + ["--aux_targets", "hog,siglip", "--max_steps", "1", "--results_dir", str(tmp_path)])
    p, args, explicit = train_tokenizer.parse_args([])  # the paper's run: all three targets and the GAN
    assert (args.aux_targets, args.disc, args.disc_start, args.disc_weight) == \
        ("hog,dinov2,siglip", "dino", 30_000, 0.4)
    r = _cli("--preset", "tiny", "--disc", "proxy")
    assert r.returncode == 2 and "--disc proxy needs --disc_proxy_ckpt" in r.stderr


def test_compile_runs_the_gan_step_and_a_foreign_optimizer_state_is_a_clear_error(tmp_path, disc_proxy, monkeypatch):
    """--compile with the GAN on (the adaptive weight's layer kept eager), traced by dynamo's eager backend so the
    path runs in seconds on CPU; then a checkpoint whose optimizer holds another parameter set (one written
    before a parameter became frozen) stops the resume with the way out."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **k: real(model, backend="eager"))
    run = train_tokenizer.main(BASE + [*disc_proxy, "--disc_start", "0", "--compile", "--max_steps", "2",
                                       "--results_dir", str(tmp_path)])
    torch._dynamo.reset()
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2] and all(r["d_weight"] > 0 for r in m)
    path = os.path.join(run, "checkpoints", "0000002.pt")
    ck = torch.load(path, weights_only=True)
    ck["optimizer"]["param_groups"][0]["params"].append(10_000)
    torch.save(ck, path)
    with pytest.raises(SystemExit, match="does not fit the parameters this version trains"):
        train_tokenizer.main(BASE + ["--max_steps", "3", "--resume", run])


def test_rank_zero_takes_every_thread_for_its_metrics():
    """torchrun starts ranks with one thread; rank 0's metrics (FID's sqrtm in SciPy's BLAS too) get them all."""
    from threadpoolctl import threadpool_info, threadpool_limits
    import engine
    try:
        with threadpool_limits(1):
            engine.use_all_threads()
            n = len(os.sched_getaffinity(0))
            assert torch.get_num_threads() == n
            assert all(p["num_threads"] == n for p in threadpool_info() if p["user_api"] == "blas")
    finally:
        torch.set_num_threads(min(2, torch.get_num_threads()))


def test_the_diffusability_monitor_logs_finite_values_and_leaves_the_run_unchanged(tmp_path):
    """--diffusability_every: LNC, probe and VIV_norm of the EMA latents in metrics.jsonl, and the same losses at
    every step as the run without it (it draws no random numbers)."""
    flags = BASE + ["--max_steps", "2", "--diffusability_images", "40"]
    plain = train_tokenizer.main(flags + ["--diffusability_every", "-1", "--results_dir", str(tmp_path / "a")])
    watched = train_tokenizer.main(flags + ["--diffusability_every", "1", "--results_dir", str(tmp_path / "b")])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows
                          if not any(k.startswith("monitor_") for k in r)]
    assert strip(metrics(plain)) == strip(metrics(watched))
    mon = [r for r in metrics(watched) if "monitor_lnc" in r]
    assert [r["step"] for r in mon] == [1, 2]
    for r in mon:
        assert all(math.isfinite(r[f"monitor_{k}"]) for k in ("lnc", "linear_probe_accuracy", "viv_norm"))
        assert 0 <= r["monitor_lnc"] <= 1 and 0 <= r["monitor_linear_probe_accuracy"] <= 1
    assert "the diffusability monitor took" in open(os.path.join(watched, "log.txt")).read()
    import diffusability
    labels = list(range(1000)) * 3                                         # ImageNet-like: 50 classes, 2 of each
    idx = diffusability.monitor_subset(labels, 100)
    assert len(idx) == 100 and len({labels[i] for i in idx}) == 50
    import evaluate
    evaluate.main(["curves", "--run", watched])                            # its curves beside the reconstruction
    assert os.path.getsize(os.path.join(watched, "curves.png")) > 0
