"""
The run machinery every nanotok script shares: device and DDP setup (NCCL on GPU, gloo on CPU), autocast, the
numbered run folder with log.txt / metrics.jsonl, atomic checkpoints (find / load / rotate), EMA, RNG state,
the resume merge of flags, the step-indexed data stream and the gradient-accumulation step. It reads nanotok's
own checkpoints; released.py decides what any other checkpoint file is.

Model files hold modules and math; scripts hold their loop; this file holds what the loops have in common.
"""
import argparse
import glob
import json
import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import data

# ----------------------------------------------------------------------------------------------------------
# devices and precision


def setup_distributed():
    """torchrun sets RANK: DDP with NCCL on GPU, gloo on CPU; otherwise one process. TF32: autocast_context."""
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ddp, rank, world, local, device


PRECISIONS = ("auto", "bf16", "tf32", "fp32")
PRECISION_HELP = ("auto = bf16 autocast on GPU, fp32 on CPU; bf16 (with TF32 for the fp32 ops); tf32 = fp32 weights "
                  "and activations, TF32 matmuls and convs; fp32 = full fp32 (TF32 off)")


def autocast_context(flag, device):
    """--precision: the autocast context, and TF32 (GPU matmuls and convs) on for bf16 / tf32, off for fp32."""
    precision = ("bf16" if device.type == "cuda" else "fp32") if flag == "auto" else flag
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision in ("bf16", "tf32")
    return precision, (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())


def wrap_model(model, compile, ddp, device, local):
    """The module the loop calls: DDP first, then torch.compile of the DDP module (the PyTorch DDP + compile
    recipe: compiled inside DDP, the all-reduce waits for the whole compiled backward instead of overlapping it;
    compiled around it, DDPOptimizer splits the graph at the bucket boundaries)."""
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        for p in model.parameters():  # a gradient that is a view (a cls token's at micro-batch 1: a slice of the
            if p.requires_grad:       # token gradient) has the strides of that slice; DDP warns and copies it
                p.register_hook(lambda g, s=p.stride(): g if g.stride() == s else
                                g.clone(memory_format=torch.contiguous_format))
        model = DDP(model, device_ids=[local] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def keep_eager(model, weights):
    """The layers owning `weights` run outside torch.compile's graphs. An adaptive weight differentiates a loss
    w.r.t. one layer's weight: inside a compiled graph that costs the graph's whole backward (the graph is one
    autograd node), outside it only the layer's and the loss's."""
    for module in model.modules():
        if any(getattr(module, "weight", None) is w for w in weights):
            module.forward = torch.compiler.disable(module.forward)


def micro_batching(global_batch, micro, world):
    """(micro batch per rank, accumulation steps) or a clear exit."""
    if global_batch < world:
        sys.exit(f"error: --global_batch_size {global_batch} is smaller than the world size {world}: every rank "
                 f"needs at least one image per step; raise it to a multiple of {world}")
    micro = micro or global_batch // world
    if global_batch % (micro * world):
        sys.exit(f"error: --global_batch_size {global_batch} is not divisible by world size {world} x "
                 f"--micro_batch_size {micro}")
    return micro, global_batch // (micro * world)


def resume_micro_batch(global_batch, micro, saved_world, world):
    """The micro-batch of a run resumed on `world` ranks: `micro` (given now, or the saved run's; None: the saved
    run's global / world, what its ranks fitted in memory), lowered to the largest size that divides the new
    per-rank share. The global batch never changes; accumulation takes up the rest (micro_batching)."""
    micro = micro or max(1, global_batch // saved_world)
    share = global_batch // world if global_batch % world == 0 else 0
    return max((m for m in range(1, min(micro, share) + 1) if share % m == 0), default=micro)


def count(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# flags: presets' recipes and the resume merge

def explicit_flags(parser, argv=None):
    """The dests of the flags given on the command line (not their defaults)."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]
    return set(vars(given))


def apply_recipe(args, recipe, explicit):
    """A preset's recipe replaces the defaults it names; explicit flags win."""
    for k, v in recipe.items():
        if k not in explicit:
            setattr(args, k, v)
    return args


def resume_args(parser, args, explicit, saved, resume_flags):
    """Flags of a resumed run: every default (flags added since the checkpoint was written), then the checkpoint's
    args, then the run-length flags given explicitly now. Other explicit flags are ignored; returns them too."""
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    given = vars(args)
    over = {k: given[k] for k in explicit if k in resume_flags}
    ignored = sorted(k for k in explicit if k not in resume_flags and saved.get(k, given[k]) != given[k])
    return argparse.Namespace(**{**defaults, **saved, **over}), ignored


def cosine_lr(step, peak, warmup, horizon, min_ratio):
    """Linear warmup, then cosine from peak to peak * min_ratio at step `horizon` (timm cosine, per step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, horizon - warmup)
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


# ----------------------------------------------------------------------------------------------------------
# checkpoints

def find_checkpoint(path):
    """A checkpoint file, or the newest checkpoints/*.pt of a run folder (official releases: released.locate)."""
    if os.path.isfile(path):
        return path
    ckpts = sorted(glob.glob(os.path.join(path, "checkpoints", "*.pt")))
    if not ckpts:
        sys.exit(f"error: {path!r} is neither a checkpoint file nor a run folder with checkpoints/*.pt")
    return ckpts[-1]


def load_checkpoint(path):
    """What a checkpoint file (or a run folder's newest) holds, read with weights_only; a clear error if it cannot be
    read. This knows nanotok's files only: released.load also converts the official releases."""
    try:
        return torch.load(find_checkpoint(path), map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: cannot read checkpoint {path!r} ({type(e).__name__}: {e}); is it a nanotok checkpoint?")


def save_checkpoint(state, path):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


@torch.no_grad()
def ema_update(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def fresh_seed(seed, step, rank):
    """A seed for a rank that joins at `step`: no other rank's (seed * world + rank) stream can reach it."""
    return (1 << 62) ^ (seed << 40) ^ (step << 12) ^ rank


def rng_state(device):
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda"
            else torch.zeros(0, dtype=torch.uint8)}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"], device)


class Run:
    """A numbered results folder (or, resuming, the checkpoint's own) with rank-0 logging to log.txt and
    metrics.jsonl, and checkpoints holding every rank's RNG state, written atomically, the newest `keep` kept."""

    def __init__(self, results_dir, name, resume, ddp, rank, world):
        self.ddp, self.rank, self.world = ddp, rank, world
        if resume:
            self.dir = os.path.dirname(os.path.dirname(os.path.abspath(find_checkpoint(resume))))
        else:
            box = [None]
            if rank == 0:
                os.makedirs(results_dir, exist_ok=True)
                idx = len(glob.glob(os.path.join(results_dir, "*")))
                box = [os.path.join(results_dir, f"{idx:03d}-{name}")]
            if ddp:
                dist.broadcast_object_list(box)
            self.dir = box[0]
        if rank == 0:
            for sub in ("checkpoints", "grids"):
                os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        check_shared_folder(self.dir, rank, world, "the run folder")
        self.log_file = open(os.path.join(self.dir, "log.txt"), "a") if rank == 0 else None

    def log(self, msg):
        if self.rank == 0:
            tqdm.write(msg)
            self.log_file.write(msg + "\n")
            self.log_file.flush()

    def metrics(self, rec):
        if self.rank == 0:
            with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint(self, make_state, step, keep, device):
        """Gather the RNG states of all ranks, then rank 0 writes make_state() + rng; all ranks wait."""
        rngs = [None] * self.world
        if self.ddp:
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs = [rng_state(device)]
        if self.rank == 0:
            save_checkpoint({**make_state(), "rng": rngs}, os.path.join(self.dir, "checkpoints", f"{step:07d}.pt"))
            old = sorted(glob.glob(os.path.join(self.dir, "checkpoints", "*.pt")))
            for f in old[:-keep] if keep > 0 else []:
                os.remove(f)
        if self.ddp:
            dist.barrier()

    def restore_rng(self, ckpt, device, seed):
        """Per-rank RNG streams of a resumed run, exactly as they were. On more ranks than the checkpoint has, a new
        rank takes a fresh stream of its own (never a copy of another rank's: masks, t and noise would repeat)."""
        saved = ckpt["rng"]
        if len(saved) != self.world:
            self.log(f"resume: checkpoint saved with {len(saved)} ranks, resuming on {self.world}: ranks "
                     f"0-{min(len(saved), self.world) - 1} continue their streams" +
                     (f", ranks {len(saved)}-{self.world - 1} start fresh ones" if self.world > len(saved) else "") +
                     "; the run continues but is not bitwise an uninterrupted one")
        if self.rank < len(saved):
            set_rng_state(saved[self.rank], device)
        else:  # seeded by (seed, step, rank): distinct from every other rank and from the streams before
            torch.manual_seed(fresh_seed(seed, ckpt["step"], self.rank))


# ----------------------------------------------------------------------------------------------------------
# the training step

def step_batches(ds, step, steps_per_epoch, accum, micro, seed, rank, world, num_workers, pin, in_memory=False):
    """Micro-batches from optimizer step `step` on: the data position is a function of the step, so a resumed run
    sees exactly the batches of an uninterrupted one. in_memory: collate in this process (latent caches)."""
    epoch, s = divmod(step, steps_per_epoch)
    while True:
        bs = data.epoch_batches(len(ds), epoch, seed, rank, world, micro, start=s * accum)
        bs = bs[:(steps_per_epoch - s) * accum]
        if in_memory:
            yield from (torch.utils.data.default_collate([ds[i] for i in b]) for b in bs)
        else:  # own generator: the loader never draws from the global RNG
            yield from torch.utils.data.DataLoader(ds, batch_sampler=bs, num_workers=num_workers, pin_memory=pin,
                                                   generator=torch.Generator())
        epoch, s = epoch + 1, 0


def add_terms(sums, losses, n):
    """Add a micro-batch's scalar loss terms, over n micro-batches, to sums (detached tensors: no host sync)."""
    for k, v in losses.items():
        if torch.is_tensor(v) and v.dim() == 0:
            sums[k] = sums.get(k, 0.0) + v.detach().float() / n


def clip_gradients(params, clip):
    """The pre-clip gradient norm (every step: the non-finite check reads it), clipped to `clip` when > 0."""
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def nonfinite_streak(gnorm, streak, patience, log, step, what="gradient norm"):
    """The count of consecutive non-finite steps after this one (0: finite, the update goes ahead). A NaN / inf in
    any rank's loss reaches every rank's all-reduced gradients, so all ranks decide alike. The caller skips the
    update (optimizer, EMA, discriminator untouched); `patience` in a row stop the run with the last good
    checkpoint intact (nothing is written on the way out)."""
    if bool(torch.isfinite(gnorm)):
        return 0
    streak += 1
    log(f"step {step + 1}: non-finite {what} ({gnorm.item()}): update skipped ({streak} in a row)")
    if streak >= patience:
        sys.exit(f"error: {streak} consecutive steps with a non-finite {what} (last at step {step + 1}): the run "
                 f"stops; its last checkpoint is the last good state. Lower --lr, check the data, or resume with "
                 f"--precision fp32")
    return streak


def reduce_means(sums, n, ddp, world, extra=()):
    """Means of summed scalar terms over n steps (or n[k] steps for term k: terms that start mid-interval, such
    as the GAN's) and all ranks -> floats; `extra` are summed across ranks."""
    keys = sorted(sums)
    vals = torch.stack([sums[k] / (n[k] if isinstance(n, dict) else n) for k in keys]
                       + [torch.tensor(float(e)).to(sums[keys[0]]) for e in extra])
    if ddp:
        dist.all_reduce(vals)
        vals[:len(keys)] /= world
    vals = vals.tolist()
    return dict(zip(keys, vals[:len(keys)])), vals[len(keys):]


def check_shared_folder(path, rank, world, what):
    """Every rank must see `path` as rank 0 does: checkpoints, cache shards and sample parts are written by one rank
    and read by others, which holds across nodes only on a filesystem they share. Rank 0 writes a token there and
    every rank reads it; if any cannot, every rank stops now, with a message, instead of at the first gather."""
    if world == 1:
        return
    nonce = [None]
    if rank == 0:  # a name of its own: two jobs checking one folder at once never see each other's token
        os.makedirs(path, exist_ok=True)
        nonce = [f"{os.getpid()}-{os.urandom(8).hex()}"]
        with open(os.path.join(path, f".nanotok-shared-{nonce[0]}"), "w") as f:
            f.write(nonce[0])
    dist.broadcast_object_list(nonce)                                        # after rank 0's write
    token = os.path.join(path, f".nanotok-shared-{nonce[0]}")
    try:
        with open(token) as f:
            seen = f.read() == nonce[0]
    except OSError:
        seen = False
    views = [None] * world
    dist.all_gather_object(views, (seen, os.uname().nodename))
    if rank == 0:
        os.remove(token)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        sys.exit(f"error: {what} {path!r} is not shared: {', '.join(blind)} cannot see what rank 0 writes there. "
                 f"Multi-node runs need a filesystem mounted on every node (NFS, Lustre, ...): give a path on it")


def use_all_threads():
    """Every CPU thread of the machine for this process (rank 0's metrics once the other ranks are done): torchrun
    starts each rank with OMP_NUM_THREADS=1, which PyTorch and NumPy / SciPy's BLAS (FID's sqrtm) both read."""
    n = len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    from threadpoolctl import threadpool_limits
    threadpool_limits(n)


def gather_to_rank0(obj, rank, world):
    """The list of every rank's obj on rank 0 (None elsewhere): features go to the one rank that needs them."""
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
