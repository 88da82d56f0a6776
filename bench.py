"""
Benchmarks on the current device (CPU, or one GPU with bf16 autocast): throughput, model FLOP utilisation (MFU)
and peak memory of tokenizer and denoiser training, of sampling (SiT-XL + the MAETok decoder, the paper's 250 SDE
steps with CFG on an interval), of the feature networks, and of the GAN step. The MAETok-B-128 rows are the paper
run's step: HOG, DINOv2-L and SigLIP targets (their teachers' forwards included) and LPIPS, plus the DINO GAN after
its start (random weights: speed does not depend on the values). Numbers go in docs/; nothing here is asserted.

  python bench.py                       # everything, eager
  python bench.py --compile             # every training / sampling row eager and torch.compile'd
  python bench.py --only gan            # tokenizer | gan | pretrained | diffusion | sampling
  python bench.py --quick               # the tiny presets only, a few steps (a smoke test on CPU)

MFU = model FLOPs per second / the device's dense peak. Model FLOPs are counted by torch.utils.flop_counter on one
eager step (forward + backward for training, 2 per multiply-add, no recomputation). The peak is the datasheet's
dense bf16 tensor-core rate on a GPU (PEAK_BF16), and on CPU an fp32 estimate: threads x clock x FMA width (the
clock /proc/cpuinfo reports now, so turbo makes CPU MFU read high). A MIG slice's peak is the whole GPU's times
its share of the streaming multiprocessors. Sampling runs --sample_steps steps (2 on CPU, 25 on GPU) and
extrapolates to the paper's 250.
"""
import argparse
import resource
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion import DiT, Transport, guided_velocity
from diffusion import make_config as make_dit_config
from pretrained import (LPIPS, SIGLIP_SO400M, DINOv2Target, DinoViT, FeatureTarget, FIDInceptionV3, SigLIPViT,
                        ViTConfig, dinov2_config)
from proxy import ProxyConfig, ProxyNet
from tokenizer import build, make_config

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, and the whole GPU's streaming multiprocessors, by a
# substring of torch.cuda.get_device_name(); first match
PEAK_BF16 = [
    ("H200", 989.4e12, 132),       # NVIDIA H200 datasheet (SXM): 1,979 TFLOPS bf16 with sparsity
    ("H100 PCIe", 756.0e12, 114),  # NVIDIA H100 datasheet, PCIe: 1,513 with sparsity
    ("H100 NVL", 835.0e12, 132),   # NVIDIA H100 datasheet, NVL: 1,671 with sparsity
    ("H100", 989.4e12, 132),       # NVIDIA H100 datasheet, SXM5: 1,979 with sparsity
    ("A100", 312.0e12, 108),       # NVIDIA A100 datasheet: 312 (624 with sparsity)
    ("L40S", 362.05e12, 142),      # NVIDIA L40S datasheet: 362.05 (733 with sparsity)
    ("RTX 4090", 165.2e12, 128),   # NVIDIA Ada whitepaper, GeForce RTX 4090: bf16 with fp32 accumulate
]


def peak_flops(device):
    """(FLOP/s, description) of the device, or (None, why) when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return gpu_peak(name, sms)
    try:
        info = open("/proc/cpuinfo").read()
        mhz = float(info.split("cpu MHz")[1].split(":")[1].split()[0])
        lanes = 64 if " avx512f" in info else 32 if " avx2" in info and " fma" in info else 8  # FP32 FLOP / cycle
    except (OSError, IndexError, ValueError):
        return None, "CPU: clock unknown"
    n = torch.get_num_threads()
    peak = n * mhz * 1e6 * lanes
    return peak, f"CPU fp32 estimate: {n} threads x {mhz / 1e3:.2f} GHz x {lanes} FLOP/cycle = {peak / 1e9:.0f} GFLOP/s"


def gpu_peak(name, sms):
    """(FLOP/s, description) of a GPU from its name and its streaming multiprocessors: a MIG slice (fewer SMs than
    the whole GPU) gets its share of the peak."""
    for key, peak, full in PEAK_BF16:
        if key in name:
            share = min(1.0, sms / full)
            slice_ = f" x {sms}/{full} SMs (a MIG slice)" if share < 1 else ""
            return peak * share, f"{name}: {peak / 1e12:.0f} TFLOP/s dense bf16{slice_}"
    return None, f"{name}: no peak in bench.PEAK_BF16"


def timed(fn, steps, warmup, device):
    """Seconds per call of fn, after warmup calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process peak RSS"


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


class Report:
    """One printed line per row: throughput, model TFLOP/s and MFU against the device peak, memory."""

    def __init__(self, device):
        self.device = device
        self.peak, desc = peak_flops(device)
        print(f"peak for MFU: {desc}")

    def row(self, what, batch, seconds, step_flops, unit="img/s", note=""):
        achieved = step_flops / seconds
        mfu = f"MFU {100 * achieved / self.peak:5.1f}%" if self.peak else "MFU n/a"
        print(f"{what:58s} batch {batch:4d}: {batch / seconds:9.4g} {unit} {seconds * 1e3:9.0f} ms/step "
              f"{achieved / 1e12:7.3f} TFLOP/s  {mfu}  {note}{peak_memory(self.device)}")


def train_rate(model, loss_fn, args, device, compiled):
    """Seconds per optimizer step (AdamW) of loss_fn(model), the model FLOPs of one step (eager), the memory."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_flops = flops(lambda: loss_fn(model).backward())
    opt.zero_grad(set_to_none=True)
    fwd = torch.compile(model) if compiled else model
    reset_peak(device)

    def step():
        loss_fn(fwd).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    warmup = max(args.warmup, 2) if compiled else args.warmup  # compiling happens in the first calls
    return timed(step, args.steps, warmup, device), step_flops


def variants(args):
    return (False, True) if args.compile else (False,)


def tag(compiled):
    return "compiled" if compiled else "eager"


def paper_maetok(device):
    """MAETok-B-128 as the paper trains it: HOG, DINOv2-L/14 (converted to patch 16) and SigLIP SO400M targets,
    and LPIPS-VGG; every frozen network with random weights."""
    model = build(make_config("MAETok-B-128", aux_targets=("hog", "dinov2", "siglip"))).to(device).train()
    c = model.cfg
    vc = ViTConfig(**{**dinov2_config("vitl14").__dict__, "patch_size": c.patch_size, "img_size": c.image_size})
    model.set_feature_target("dinov2", DINOv2Target(DinoViT(vc).eval().requires_grad_(False), c.grid_size).to(device))
    siglip = SigLIPViT(*SIGLIP_SO400M, patch_size=c.patch_size).eval().requires_grad_(False)
    model.set_feature_target("siglip", FeatureTarget(siglip).to(device))
    return model, LPIPS().to(device).eval().requires_grad_(False)


def bench_tokenizer(args, device, ctx, rep):
    """tiny (the quick start's step), and MAETok-B-128's paper step before the GAN starts (teachers, LPIPS)."""
    rows = [("tiny", 64)] if args.quick else [("tiny", 64), ("MAETok-B-128", args.batch_size)]
    for preset, batch in rows:
        model, lpips = paper_maetok(device) if preset != "tiny" else (build(make_config(preset)).to(device).train(),
                                                                      None)
        x = torch.rand(batch, 3, model.cfg.image_size, model.cfg.image_size, device=device) * 2 - 1

        def loss(fwd):
            with ctx:
                out = fwd(x, model.sample_mask(batch, device))
                return out["loss"] + (lpips(out["rec"].float(), x).mean() if lpips is not None else 0)
        what = "HOG + DINOv2-L + SigLIP targets, LPIPS" if lpips is not None else "HOG target"
        for compiled in variants(args):
            s, fl = train_rate(model, loss, args, device, compiled)
            rep.row(f"tokenizer {preset} training {model.cfg.image_size} px, {what} ({tag(compiled)})", batch, s,
                    fl, note=f"{fl / batch / 1e9:.3g} GFLOPs/img fwd+bwd, ")


def bench_gan(args, device, ctx, rep):
    """MAETok-B-128's paper step (teachers, LPIPS) with the DINO discriminator (random weights): the generator step
    with and without the GAN term (one D pass with gradient through the frozen trunk, the adaptive weight) and the
    D step (4 D passes, trunk without autograd, heads backward), each with its AdamW step."""
    from discriminator import DinoDiscTrunk, GANLoss, dino_discriminator
    B = args.batch_size
    model, lpips = paper_maetok(device)
    disc = dino_discriminator(DinoDiscTrunk().to(device).eval().requires_grad_(False)).to(device)
    gan = GANLoss(disc, disc_start=0).to(device)
    opt_g = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.rand(B, 3, 256, 256, device=device) * 2 - 1
    rec = {}

    def g_step(adversarial):
        with ctx:
            out = model(x, model.sample_mask(B, device))
            perceptual = lpips(out["rec"].float(), x).mean()
            loss = out["loss"] + perceptual
            if adversarial:
                term, _ = gan.generator_term(out["rec"], out["pixel"] + perceptual, model.last_layer)
                loss = loss + term
            rec["x"] = out["rec"].detach()
        loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

    def d_step():
        with ctx:
            loss = gan.discriminator_loss(disc, x, rec["x"])["loss"]
        loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
    reset_peak(device)
    t_plain = timed(lambda: g_step(False), args.steps, args.warmup, device)
    t_g = timed(lambda: g_step(True), args.steps, args.warmup, device)
    t_d = timed(d_step, args.steps, args.warmup, device)
    print(f"GAN MAETok-B-128 batch {B:4d}: G step {t_plain * 1e3:.0f} ms without / {t_g * 1e3:.0f} ms with the GAN "
          f"term, D step {t_d * 1e3:.0f} ms = {t_d / t_plain:.2f}x the plain G step; a GAN step costs "
          f"{(t_g + t_d) / t_plain:.2f}x one without ({B * 1 / (t_g + t_d):.1f} img/s), {peak_memory(device)}")


@torch.no_grad()
def bench_pretrained(args, device, ctx, rep):
    # random weights: speed does not depend on the values
    nets = [("FID InceptionV3 (pool3, TF resize)", FIDInceptionV3("tf"), 256, lambda n: torch.rand(n, 3, 256, 256)),
            ("LPIPS-VGG 256 px (pair)", LPIPS(), 256, None),
            ("DINOv2-B/14 224 px", DinoViT(dinov2_config("vitb14")), 224, lambda n: torch.randn(n, 3, 224, 224)),
            ("proxy classifier 32 px", ProxyNet(ProxyConfig()), 32, lambda n: torch.rand(n, 3, 32, 32) * 2 - 1)]
    for name, net, res, make in nets[:1] if args.quick else nets:
        net = net.to(device).eval()
        n = 2 if args.quick else args.feature_batch
        if make is None:
            x0, x1 = (torch.rand(n, 3, res, res, device=device) * 2 - 1 for _ in range(2))
            fn = lambda: net(x0, x1)
        else:
            x = make(n).to(device)
            fn = lambda: net(x)
        with ctx:
            fl = flops(fn)
            reset_peak(device)
            s = timed(fn, args.steps, args.warmup, device)
        rep.row(f"{name} forward", n, s, fl)


def bench_diffusion(args, device, ctx, rep):
    """Denoiser training on the tokenizers' latents: the tiny one's, and 128 x 32 tokens (MAETok) for the XL."""
    tiny = make_config("tiny")
    rows = [("tiny", (tiny.num_latent_tokens, tiny.latent_dim), 64)]
    if not args.quick:
        rows += [("SiT-XL", (128, 32), args.batch_size), ("LightningDiT-XL", (128, 32), args.batch_size)]
    for preset, (L, C), batch in rows:
        model = DiT(make_dit_config(preset, in_channels=C, num_tokens=L, num_classes=1000)).to(device).train()
        x, y, tr = torch.randn(batch, L, C, device=device), torch.randint(1000, (batch,), device=device), Transport()

        def loss(fwd):
            with ctx:
                return tr.loss(fwd, x, y)["loss"]
        for compiled in variants(args):
            s, fl = train_rate(model, loss, args, device, compiled)
            rep.row(f"diffusion {preset} training {L}x{C} tokens ({tag(compiled)})", batch, s, fl,
                    note=f"{fl / batch / 1e9:.4g} GFLOPs/img fwd+bwd, ")


def guided_steps(n, interval=(0.0, 0.75)):
    """How many of the n SDE steps (t = linspace(1, 0.04, n)) fall in the guidance interval."""
    t = torch.linspace(1, 0.04, n, dtype=torch.float64)
    return int(((t >= interval[0]) & (t <= interval[1])).sum())


@torch.no_grad()
def bench_sampling(args, device, ctx, rep):
    """Images per second of sample.py's loop: the denoiser's SDE with CFG on [0, 0.75] (the batch doubles on those
    steps) and one decode. SiT-XL + MAETok-B-128's decoder at the MAETok paper's 250 steps, CFG 1.9; tiny + tiny."""
    rows = [("tiny", "tiny", 64, 10)] if args.quick else [("tiny", "tiny", 64, 250),
                                                          ("SiT-XL", "MAETok-B-128", args.sample_batch, 250)]
    for preset, tok_preset, batch, steps in rows:
        tok = build(make_config(tok_preset, aux_targets=())).to(device).eval()
        L, C = tok.latent_shape
        model = DiT(make_dit_config(preset, in_channels=C, num_tokens=L, num_classes=1000)).to(device).eval()
        for p in model.parameters():  # off the adaLN-Zero init, so the work is a trained model's
            p.add_(0.02 * torch.randn_like(p))
        y, noise = torch.randint(1000, (batch,), device=device), torch.randn(batch, L, C, device=device)
        run = steps if preset == "tiny" else min(steps, args.sample_steps)   # extrapolated to `steps`
        with ctx:
            fwd = flops(lambda: model(noise, torch.rand(batch, device=device), y))   # one unguided call
            dec = flops(lambda: tok.decode(noise))
        calls = steps + guided_steps(steps)                                   # a guided step is 2 calls
        for compiled in variants(args):
            if compiled:
                model.compile(fullgraph=True)  # in place, as sample.py --compile

            def sample():
                with ctx:
                    z = Transport().sample(guided_velocity(model, y, 1.9, (0.0, 0.75)), noise, "sde", run)
                    tok.decode(z)
            s = timed(sample, 1 if run < steps else max(1, args.steps // 2), 1, device)
            if run < steps:  # extrapolate the measured calls to the full count
                with ctx:
                    t_dec = timed(lambda: tok.decode(noise), 1, 0, device)
                s = t_dec + (s - t_dec) * calls / (run + guided_steps(run))
            rep.row(f"sampling {preset} + {tok_preset} decoder, {steps} SDE steps, CFG ({tag(compiled)})",
                    batch, s, fwd * calls + dec)


def main():
    p = argparse.ArgumentParser(description="nanotok benchmarks on the current device")
    p.add_argument("--only", default="tokenizer,gan,pretrained,diffusion,sampling",
                   help="comma list of benchmark groups")
    p.add_argument("--quick", action="store_true", help="the tiny presets, 1 timed step (runs in seconds on CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="MAETok-B-128 / SiT-XL batch (default 4 CPU, 64 GPU)")
    p.add_argument("--sample_batch", type=int, default=None, help="SiT-XL sampling batch (default 4 CPU, 256 GPU)")
    p.add_argument("--feature_batch", type=int, default=None, help="feature-network batch (default 16 CPU, 256 GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed iterations (default 3 CPU, 20 GPU)")
    p.add_argument("--sample_steps", type=int, default=None,
                   help="sampling steps actually run, extrapolated to 250 (default 2 CPU, 25 GPU; tiny: all)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1 CPU, 5 GPU)")
    p.add_argument("--compile", action="store_true", help="also time every training / sampling row compiled")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (64 if gpu else 4)
    args.sample_batch = args.sample_batch or (256 if gpu else 4)
    args.feature_batch = args.feature_batch or (256 if gpu else 16)
    args.steps = args.steps or (1 if args.quick else 20 if gpu else 3)
    args.sample_steps = args.sample_steps or (25 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 5 if gpu else 1)
    if args.quick:
        args.only = ",".join(g for g in args.only.split(",") if g != "gan")  # no tiny GAN row
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else nullcontext()
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | {'bf16 autocast' if gpu else 'fp32'}")
    rep = Report(device)
    groups = args.only.split(",")
    torch.manual_seed(0)
    for g, fn in (("tokenizer", bench_tokenizer), ("gan", bench_gan), ("pretrained", bench_pretrained),
                  ("diffusion", bench_diffusion), ("sampling", bench_sampling)):
        if g in groups:
            fn(args, device, ctx, rep)


if __name__ == "__main__":
    main()
