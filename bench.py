"""
Benchmarks on the current device (CPU, or one GPU with bf16 autocast): throughput and peak memory of
tokenizer training, of the pretrained feature networks, and of diffusion training, sampling and forward
FLOPs. Numbers go in the README; nothing here is asserted by a test.

  python bench.py                       # everything
  python bench.py --only gan            # tokenizer | gan | pretrained | diffusion
On CPU the XL sampling rate is extrapolated from 2 steps to 50.
"""
import argparse
import resource
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion import DiT, Transport, guided_velocity
from diffusion import make_config as make_dit_config
from pretrained import FIDInceptionV3, LPIPS, DinoViT, dinov2_config
from proxy import ProxyConfig, ProxyNet
from tokenizer import build, make_config


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


def gflops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def train_rate(model, loss_fn, args, device):
    """Seconds per optimizer step (AdamW) of loss_fn(model), and the peak memory."""
    reset_peak(device)
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        loss_fn(fwd).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, args.steps, args.warmup, device), peak_memory(device)


def bench_tokenizer(args, device, ctx):
    for preset, batch in (("tiny", 64), ("MAETok-B-128", args.batch_size)):
        model = build(make_config(preset)).to(device).train()
        x = torch.rand(batch, 3, model.cfg.image_size, model.cfg.image_size, device=device) * 2 - 1

        def loss(fwd):
            with ctx:
                return fwd(x, model.sample_mask(batch, device))["loss"]
        s, mem = train_rate(model, loss, args, device)
        fl = gflops(lambda: model.eval()(x[:1])["loss"])
        print(f"tokenizer {preset:13s} train  batch {batch:4d}: {batch / s:8.1f} img/s  ({s * 1e3:.0f} ms/step), "
              f"forward {fl:.1f} GFLOPs/img, {mem}")


def bench_gan(args, device, ctx):
    """MAETok-B-128 with the DINO discriminator (random weights): the generator step with and without the GAN term
    (one D pass with gradient through the frozen trunk, the adaptive weight) and the D step (4 D passes, trunk
    without autograd, heads backward), each with its AdamW step."""
    from discriminator import DinoDiscTrunk, GANLoss, dino_discriminator
    B = args.batch_size
    model = build(make_config("MAETok-B-128")).to(device).train()
    disc = dino_discriminator(DinoDiscTrunk().to(device).eval().requires_grad_(False)).to(device)
    gan = GANLoss(disc, disc_start=0).to(device)
    opt_g = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.rand(B, 3, 256, 256, device=device) * 2 - 1
    rec = {}

    def g_step(adversarial):
        with ctx:
            out = model(x, model.sample_mask(B, device))
            loss = out["loss"]
            if adversarial:
                term, _ = gan.generator_term(out["rec"], out["pixel"], model.decoder.head.weight)
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
def bench_pretrained(args, device, ctx):
    # random weights: speed does not depend on the values
    nets = [("FID InceptionV3 (pool3, TF resize)", FIDInceptionV3("tf"), 256, lambda n: torch.rand(n, 3, 256, 256)),
            ("LPIPS-VGG 256 px (pair)", LPIPS(), 256, None),
            ("DINOv2-B/14 224 px", DinoViT(dinov2_config("vitb14")), 224, lambda n: torch.randn(n, 3, 224, 224)),
            ("proxy classifier 32 px", ProxyNet(ProxyConfig()), 32, lambda n: torch.rand(n, 3, 32, 32) * 2 - 1)]
    for name, net, res, make in nets:
        net = net.to(device).eval()
        n = args.feature_batch
        if make is None:
            x0, x1 = (torch.rand(n, 3, res, res, device=device) * 2 - 1 for _ in range(2))
            fn = lambda: net(x0, x1)
        else:
            x = make(n).to(device)
            fn = lambda: net(x)
        reset_peak(device)
        with ctx:
            s = timed(fn, args.steps, args.warmup, device)
        mem = f", {peak_memory(device)}" if device.type == "cuda" else ""  # CPU RSS is the process's, not the net's
        print(f"{name:36s} batch {n:4d}: {n / s:8.1f} img/s{mem}")


def bench_diffusion(args, device, ctx):
    """Denoiser training img/s, 50-step Euler sampling img/s (no CFG; CFG doubles the batch) and forward FLOPs
    per image (FlopCounterMode: 2 per multiply-add; the DiT paper's "Gflops" count multiply-adds)."""
    tiny = make_config("tiny")  # the tiny denoiser runs on the tiny tokenizer's latents
    for preset, (L, C), batch in (("tiny", (tiny.num_latent_tokens, tiny.latent_dim), 64),
                                  ("SiT-XL", (128, 32), args.batch_size),
                                  ("LightningDiT-XL", (128, 32), args.batch_size)):
        model = DiT(make_dit_config(preset, in_channels=C, num_tokens=L, num_classes=1000)).to(device)
        x, y, tr = torch.randn(batch, L, C, device=device), torch.randint(1000, (batch,), device=device), Transport()

        def loss(fwd):
            with ctx:
                return tr.loss(fwd, x, y)["loss"]
        s, mem = train_rate(model, loss, args, device)
        model.eval()
        with torch.no_grad():
            fl = gflops(lambda: model(x[:1], torch.rand(1, device=device), y[:1]))
            steps = 50 if device.type == "cuda" or preset == "tiny" else 2

            def sample():
                with ctx:
                    tr.sample(guided_velocity(model, y), torch.randn_like(x), "euler", steps)
            ss = timed(sample, 1, 1, device) * 50 / steps
        print(f"diffusion {preset:15s} ({L}x{C}) batch {batch:4d}: train {batch / s:8.1f} img/s, "
              f"sample (50 Euler steps) {batch / ss:8.2f} img/s, forward {fl:.4g} GFLOPs/img "
              f"({fl / 2:.4g} GMACs), {mem}")


def main():
    p = argparse.ArgumentParser(description="nanotok benchmarks on the current device")
    p.add_argument("--only", default="tokenizer,gan,pretrained,diffusion", help="comma list of benchmark groups")
    p.add_argument("--batch_size", type=int, default=None, help="MAETok-B-128 / SiT-XL batch (default 4 CPU, 64 GPU)")
    p.add_argument("--feature_batch", type=int, default=None, help="feature-network batch (default 16 CPU, 256 GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed iterations (default 3 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1 CPU, 5 GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained models")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (64 if gpu else 4)
    args.feature_batch = args.feature_batch or (256 if gpu else 16)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else nullcontext()
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | {'bf16 autocast' if gpu else 'fp32'}")
    groups = args.only.split(",")
    torch.manual_seed(0)
    if "tokenizer" in groups:
        bench_tokenizer(args, device, ctx)
    if "gan" in groups:
        bench_gan(args, device, ctx)
    if "pretrained" in groups:
        bench_pretrained(args, device, ctx)
    if "diffusion" in groups:
        bench_diffusion(args, device, ctx)


if __name__ == "__main__":
    main()
