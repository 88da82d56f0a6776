"""
Image data for nanotok: datasets (ImageFolder layout, ADM-style .npz, a built-in procedural labeled dataset),
transforms (ADM center crop, MAETok random-resized crop, flip, to [-1, 1]), deterministic distributed
sampling, and the one uint8 conversion / PNG grid writer.

Every random choice of the data pipeline is a function of (seed, epoch, index) or (seed, epoch, rank), so a
resumed run sees exactly the batches an uninterrupted run would, whatever the number of loader workers.
"""
import json
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BUILTIN = "builtin"
BUILTIN_CLASSES = ("disk", "ring", "bar", "triangle", "plus", "pacman", "crescent", "L", "dumbbell", "tee")
BUILTIN_SCALE = (0.3, 0.42)  # shape radius / image size, drawn uniformly
BUILTIN_OFFSET = 0.05        # largest shift of the shape centre from the image centre, per axis


# ----------------------------------------------------------------------------------------------------------
# pixels

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16/32-bit gray is rescaled (not clipped), alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNGs open as I;16 or I
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if arr.max() <= 1.0 else arr
        img = Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_uint8(x: torch.Tensor, device="cpu") -> torch.Tensor:
    """The project's one conversion: float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), on `device` (the CPU
    unless a caller keeps it where it was computed)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).to(device)


def save_image_grid(columns, path, pad=2):
    """Write a PNG whose columns are image batches (B, 3, H, W) in [-1, 1]: row b shows sample b of each."""
    cols = [to_uint8(c).numpy() for c in columns]
    B, H, W, _ = cols[0].shape
    grid = np.full((B * (H + pad) + pad, len(cols) * (W + pad) + pad, 3), 255, np.uint8)
    for j, c in enumerate(cols):
        for b in range(B):
            y, x = pad + b * (H + pad), pad + j * (W + pad)
            grid[y:y + H, x:x + W] = c[b]
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# transforms (ADM guided-diffusion image_datasets.py; MAETok uses random_crop_arr with crop fraction 0.8-1.0)

def _resize_short_side(img, short):
    while min(*img.size) >= 2 * short:  # BOX halving first, as ADM, to avoid aliasing
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = short / min(*img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)


def center_crop_arr(img, size):
    """ADM center crop: short side to `size`, then the central size x size crop."""
    img = _resize_short_side(img, size)
    W, H = img.size
    x, y = (W - size) // 2, (H - size) // 2
    return img.crop((x, y, x + size, y + size))


def random_crop_arr(img, size, rng, min_crop_frac=0.8, max_crop_frac=1.0):
    """MAETok / ADM random-resized crop: short side random in [S, 1.25 S], then a random S x S crop."""
    lo, hi = math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac)
    img = _resize_short_side(img, int(rng.integers(lo, hi + 1)))
    W, H = img.size
    x, y = int(rng.integers(0, W - size + 1)), int(rng.integers(0, H - size + 1))
    return img.crop((x, y, x + size, y + size))


CROPS = ("random", "center", "short_random")


def transform(img, size, train, rng, crop="random"):
    """train: random-resized crop (MAETok), the ADM center crop (MacTok), or the short side to S and a random S x S
    crop (AlignTok / VA-VAE: 'short_random'), + horizontal flip; eval: ADM center crop. -> (3, S, S) in [-1, 1]."""
    if train:
        img = (random_crop_arr(img, size, rng) if crop == "random" else center_crop_arr(img, size)
               if crop == "center" else random_crop_arr(img, size, rng, 1.0, 1.0))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        img = center_crop_arr(img, size)
    return to_tensor(img)


# ----------------------------------------------------------------------------------------------------------
# sources: each has __len__, .labels (list of int), .num_classes, .load(i) -> PIL RGB (may raise)

class ImageFolderSource:
    """root/<class>/<img> -> integer labels in sorted class order; a flat folder is one unlabeled class."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data_path {root!r} is not a folder: give an ImageFolder-layout folder "
                                    f"(class subfolders or a flat folder of images), a .npz file, or '{BUILTIN}'")
        dirs = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        self.classes = dirs or [""]
        self.files, self.labels = [], []
        for label, d in enumerate(self.classes):
            top = os.path.join(root, d) if d else root
            for dirpath, _, names in sorted(os.walk(top)):
                if not dirs and dirpath != top:
                    continue
                for n in sorted(names):
                    if not n.startswith("."):  # a non-image file is tried, skipped and counted like a bad image
                        self.files.append(os.path.join(dirpath, n))
                        self.labels.append(label)
        if not self.files:
            raise FileNotFoundError(f"--data_path {root!r} holds no files: expected images, "
                                    f"in class subfolders or directly in the folder")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.files)

    def load(self, i):
        with Image.open(self.files[i]) as img:
            img.load()  # forces decoding now, so a truncated file raises here
            return to_rgb(img)


class NpzSource:
    """ADM-style .npz: arr_0 uint8 (N, H, W, 3); labels from 'labels' or 'arr_1' when present."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data_path {path!r}: no such .npz file")
        with np.load(path) as f:
            if "arr_0" not in f:
                raise ValueError(f"{path!r} has no 'arr_0' array (expected uint8 NHWC images, ADM format)")
            self.images = f["arr_0"]
            labels = f["labels"] if "labels" in f else f["arr_1"] if "arr_1" in f else None
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"{path!r}: arr_0 must be uint8 (N, H, W, 3), got {self.images.dtype} "
                             f"{self.images.shape}")
        if len(self.images) == 0:
            raise ValueError(f"{path!r}: arr_0 is empty")
        self.labels = [0] * len(self.images) if labels is None else [int(v) for v in labels]
        self.num_classes = max(self.labels) + 1

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return Image.fromarray(self.images[i])


# ----------------------------------------------------------------------------------------------------------
# the built-in procedural dataset: 10 shape classes, deterministic from (seed, split, index)

def _shape_mask(label, u, v):
    """Boolean mask of shape `label` in its own unit frame (u, v) roughly within [-1, 1]. The classes differ in
    their coarse outline (arms, holes, notches of 4+ px at 32 px: the tiny tokenizer's patch), not in corners or
    thin strokes, which a tokenizer trained for 4 CPU minutes rounds away: with an earlier set (square, flower,
    frame, a thin plus) the quick start's reconstructions were classified at 43% against 73% with this one (both
    after 1000 tokenizer steps)."""
    r, th = np.hypot(u, v), np.arctan2(v, u)
    if label == 0:
        return r < 0.8
    if label == 1:
        return (r > 0.5) & (r < 0.88)
    if label == 2:  # bar
        return (abs(u) < 0.92) & (abs(v) < 0.34)
    if label == 3:  # equilateral triangle: inside three half-planes
        inside = np.ones_like(u, bool)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= (u * np.cos(a + np.pi) + v * np.sin(a + np.pi)) < 0.5
        return inside
    if label == 4:  # plus with thick arms
        return ((abs(u) < 0.3) & (abs(v) < 1.0)) | ((abs(v) < 0.3) & (abs(u) < 1.0))
    if label == 5:  # pac-man: a disk missing a 100-degree wedge
        return (r < 0.85) & (abs(th) > 0.87)
    if label == 6:  # crescent
        return (r < 0.85) & (np.hypot(u - 0.55, v) > 0.62)
    if label == 7:  # L
        return ((u > -0.65) & (u < -0.15) & (abs(v) < 0.8)) | ((u > -0.65) & (u < 0.65) & (v > 0.3) & (v < 0.8))
    if label == 8:  # dumbbell
        return (np.hypot(u + 0.48, v) < 0.4) | (np.hypot(u - 0.48, v) < 0.4)
    # tee
    return ((abs(u) < 0.7) & (v > 0.3) & (v < 0.8)) | ((abs(u) < 0.3) & (v > -0.95) & (v <= 0.3))


def _texture(rng, X, Y):
    """A smooth random texture in [0, 1] on pixel grids X, Y (in [0, 1]): a linear gradient or smooth noise.
    Low-frequency on purpose: the shape's outline is the image's only fine detail, so a tiny tokenizer
    spends its few CPU minutes on what carries the class, not on stripes or checkers."""
    a = rng.uniform(0, 2 * np.pi)
    if rng.integers(2) == 0:  # linear gradient
        d = np.cos(a) * X + np.sin(a) * Y
        return (d - d.min()) / (np.ptp(d) + 1e-6)
    lo = rng.random((4, 4))  # smooth noise: bilinear upsampling of a 4x4 field
    gy, gx = Y * 3, X * 3
    i, j = np.minimum(gy.astype(int), 2), np.minimum(gx.astype(int), 2)
    fy, fx = gy - i, gx - j
    return (lo[i, j] * (1 - fy) * (1 - fx) + lo[i + 1, j] * fy * (1 - fx)
            + lo[i, j + 1] * (1 - fy) * fx + lo[i + 1, j + 1] * fy * fx)


def _placed_mask(label, X, Y, rng):
    """The shape's mask on pixel grids X, Y, from the first draws of rng (scale, centre, angle)."""
    s = rng.uniform(*BUILTIN_SCALE)                                           # shape radius / image size
    # near the centre, as MNIST digits: with centres anywhere in [s, 1 - s], 700 tiny-tokenizer steps gave
    # reconstructions the proxy classifies at 14%, against 34% centred (earlier class set)
    cx, cy = 0.5 + rng.uniform(-BUILTIN_OFFSET, BUILTIN_OFFSET, size=2)
    a = rng.uniform(0, 2 * np.pi)
    u = (np.cos(a) * (X - cx) + np.sin(a) * (Y - cy)) / s                     # rotate into the shape frame
    v = (-np.sin(a) * (X - cx) + np.cos(a) * (Y - cy)) / s
    return _shape_mask(label, u, v)


def render_shape_mask(label, size, rng, ss=2):
    """The exact foreground of render_shape(label, size, rng) (same rng state): its coverage (size, size) in
    [0, 1], box-filtered as the image. The built-in data's free stand-in for ImageNet-S masks (LNC, SRSS)."""
    n = size * ss
    Y, X = (np.mgrid[0:n, 0:n] + 0.5) / n
    return _placed_mask(label, X, Y, rng).astype(np.float64).reshape(size, ss, size, ss).mean(axis=(1, 3))


def render_shape(label, size, rng, ss=2):
    """One size x size RGB image (uint8 HWC) of class `label`: a roughly centred, randomly scaled, rotated and
    coloured shape on a smooth background; rendered at ss x resolution and box-filtered (anti-aliased)."""
    n = size * ss
    Y, X = (np.mgrid[0:n, 0:n] + 0.5) / n                                     # pixel centres in [0, 1]
    m = _placed_mask(label, X, Y, rng)[..., None].astype(np.float64)
    bg0, bg1 = rng.random(3), rng.random(3)
    fg = rng.random(3)
    while np.abs(fg - (bg0 + bg1) / 2).sum() < 0.6:  # keep the shape visible against the background
        fg = rng.random(3)
    bg = bg0 + (bg1 - bg0) * _texture(rng, X, Y)[..., None]
    fgt = fg * (1 - 0.3 * rng.random() * _texture(rng, X, Y)[..., None])       # shaded foreground
    img = bg * (1 - m) + fgt * m
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))               # box filter to size x size
    img = img + rng.normal(0, 0.015, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


class BuiltinSource:
    """The embedded default: `n` procedural images (10 balanced classes, label = index mod 10) rendered at
    `size` px, deterministic from (seed, split, index). No download; train and val splits never overlap."""

    SPLITS = {"train": 0, "val": 1}

    def __init__(self, size, n, split="train", seed=0):
        if not 32 <= size <= 256:
            raise ValueError(f"the built-in dataset renders 32 to 256 px, not {size}")
        self.size, self.n, self.seed, self.split = size, n, seed, self.SPLITS[split]
        self.labels = [i % len(BUILTIN_CLASSES) for i in range(n)]
        self.classes = list(BUILTIN_CLASSES)
        self.num_classes = len(BUILTIN_CLASSES)

    def __len__(self):
        return self.n

    def load(self, i):
        rng = np.random.default_rng([self.seed, self.split, i])
        return Image.fromarray(render_shape(self.labels[i], self.size, rng))

    def mask(self, i):
        """Foreground coverage (size, size) in [0, 1] of image i."""
        return render_shape_mask(self.labels[i], self.size, np.random.default_rng([self.seed, self.split, i]))


class SubsetSource:
    """The images `idx` of a source (a held-out split), with the source interface."""

    def __init__(self, source, idx):
        self.source, self.idx = source, list(idx)
        self.labels = [source.labels[i] for i in self.idx]
        self.num_classes, self.classes = source.num_classes, getattr(source, "classes", [])
        if hasattr(source, "files"):
            self.files = [source.files[i] for i in self.idx]

    def __len__(self):
        return len(self.idx)

    def load(self, i):
        return self.source.load(self.idx[i])


def build_source(data_path, image_size, split="train", builtin_size=None):
    """'builtin' (default) | path/to/file.npz | ImageFolder-layout folder."""
    if data_path in (None, BUILTIN):
        n = builtin_size or (50_000 if split == "train" else 1_000)
        return BuiltinSource(image_size, n, split)
    if data_path.endswith(".npz"):
        return NpzSource(data_path)
    return ImageFolderSource(data_path)


# ----------------------------------------------------------------------------------------------------------
# dataset and deterministic distributed sampling

class ImageDataset(torch.utils.data.Dataset):
    """Indexed by (index, epoch) pairs. Returns (image (3, S, S) in [-1, 1], label, number of files skipped).
    An unreadable file is skipped with a warning and replaced by the next readable one; it never ends an epoch.
    Augmentation draws from a generator seeded by (seed, epoch, index)."""

    def __init__(self, source, image_size, train, seed=0, crop="random"):
        self.source, self.image_size, self.train, self.seed, self.crop = source, image_size, train, seed, crop
        self.warned = set()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        n = len(self.source)
        for skipped in range(min(n, 1000)):
            j = (i + skipped) % n
            try:
                img = self.source.load(j)
            except Exception as e:  # unreadable, truncated or not an image
                path = getattr(self.source, "files", [None] * n)[j]
                if j not in self.warned:
                    warnings.warn(f"skipping unreadable image {path or j}: {type(e).__name__}: {e}")
                    self.warned.add(j)
                continue
            rng = np.random.default_rng([self.seed, epoch, j])
            return transform(img, self.image_size, self.train, rng, self.crop), self.source.labels[j], skipped
        raise RuntimeError(f"no readable image among {min(n, 1000)} consecutive files from index {i}")


def rank_indices(n, epoch, seed, rank, world):
    """This rank's share of a per-epoch permutation of range(n): deterministic in (seed, epoch, rank);
    padded by wrapping so that every rank gets the same count (as torch's DistributedSampler)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world
    perm += perm[: total - n]
    return perm[rank::world]


def epoch_batches(n, epoch, seed, rank, world, batch_size, start=0):
    """Micro-batches of (index, epoch) for one epoch on one rank, from micro-batch `start` on (drop_last)."""
    idx = rank_indices(n, epoch, seed, rank, world)
    batches = [[(i, epoch) for i in idx[b * batch_size:(b + 1) * batch_size]]
               for b in range(len(idx) // batch_size)]
    return batches[start:]


# ----------------------------------------------------------------------------------------------------------
# latent cache (LightningDiT style): every image encoded with and without horizontal flip, in shards written
# by each rank, plus meta.json with the tokenizer's config and the per-channel latent statistics

CACHE_META = "meta.json"


def write_latent_shard(out_dir, rank, k, indices, labels, latents, latents_flip, dtype):
    """One shard file: (n, L, C) latents of images `indices` and of their mirror images; atomic."""
    if dtype == torch.float16 and max(latents.abs().max(), latents_flip.abs().max()) > 6e4:
        raise ValueError("latents exceed the float16 range: rebuild the cache with --cache_dtype float32")
    path = os.path.join(out_dir, f"shard-{rank:03d}-{k:05d}.pt")
    torch.save({"indices": torch.as_tensor(indices), "labels": torch.as_tensor(labels),
                "latents": latents.to(dtype).cpu(), "latents_flip": latents_flip.to(dtype).cpu()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return os.path.basename(path)


def channel_moments(z):
    """float64 (count, sum over (B, L) per channel, sum of squares) of latents z (B, L, C)."""
    z = z.double().reshape(-1, z.shape[-1])
    n = torch.full((1,), float(z.shape[0]), dtype=torch.float64, device=z.device)  # z's device (CUDA too)
    return torch.cat([n, z.sum(0), (z * z).sum(0)])


def moments_to_stats(m):
    """Per-channel mean and std (unbiased) from summed channel_moments."""
    n, C = m[0], (len(m) - 1) // 2
    mean = m[1:1 + C] / n
    var = (m[1 + C:] - n * mean ** 2) / (n - 1)
    return mean.float(), var.clamp_min(1e-12).sqrt().float()


class LatentCache(torch.utils.data.Dataset):
    """Reads a cache folder. Item (index, epoch) -> (latent (L, C) float32, label): the plain or the flipped
    version, chosen by a coin that is a function of (seed, epoch, index), so a resumed run sees the same data.
    Shards are memory-mapped; rows are ordered by dataset index whatever the number of ranks that wrote them."""

    def __init__(self, path, seed=0):
        meta_path = os.path.join(path, CACHE_META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"--cache_path {path!r} has no {CACHE_META}: build the cache first with "
                                    f"cache_latents.py --tokenizer_ckpt ... --cache_path {path}")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.shards = [torch.load(os.path.join(path, s), mmap=True, weights_only=True) for s in self.meta["shards"]]
        idx = torch.cat([s["indices"] for s in self.shards])
        order = idx.argsort()                                                  # row i = dataset index i
        self.shard_of = torch.cat([torch.full((len(s["indices"]),), k) for k, s in enumerate(self.shards)])[order]
        self.row_of = torch.cat([torch.arange(len(s["indices"])) for s in self.shards])[order]
        self.labels = torch.cat([s["labels"] for s in self.shards])[order].tolist()
        if len(self.labels) != self.meta["num_images"]:
            raise ValueError(f"cache {path!r} is incomplete: {len(self.labels)} of {self.meta['num_images']} "
                             f"latents found; rebuild it")
        self.mean = torch.tensor(self.meta["mean"])
        self.std = torch.tensor(self.meta["std"])
        self.seed = seed

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        flip = np.random.default_rng([self.seed, epoch, i, 7]).random() < 0.5
        shard = self.shards[self.shard_of[i]]
        return shard["latents_flip" if flip else "latents"][self.row_of[i]].float(), self.labels[i]

    def check(self, tokenizer_config=None, num_tokens=None, in_channels=None):
        """A clear error when the cache does not belong to this tokenizer / model."""
        L, C = self.meta["latent_shape"]
        if tokenizer_config is not None and tokenizer_config != self.meta["tokenizer_config"]:
            diff = sorted(k for k in tokenizer_config if tokenizer_config[k] != self.meta["tokenizer_config"].get(k))
            raise ValueError(f"the latent cache was made by another tokenizer (config differs in {diff}); "
                             f"rebuild it with cache_latents.py")
        if (num_tokens, in_channels) != (None, None) and (num_tokens, in_channels) != (L, C):
            raise ValueError(f"the latent cache holds ({L}, {C}) latents but the model expects "
                             f"({num_tokens}, {in_channels})")
        if len(self.mean) != C or len(self.std) != C:
            raise ValueError(f"the cache statistics have {len(self.mean)} channels, its latents {C}")


# ----------------------------------------------------------------------------------------------------------
# subsets that see every class. ImageFolder order is class-sorted, so "the first n" of a folder holds a few
# classes only: every evaluation subset and split goes through these

def balanced_order(labels, seed=0):
    """All indices, the classes interleaved in proportion to their sizes (a seeded shuffle within each class,
    element j of a class of size m placed at (j + 0.5) / m): any prefix is a class-stratified sample."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keys[rng.permutation(idx)] = (np.arange(len(idx)) + 0.5) / len(idx)
    return np.lexsort((labels, keys)).tolist()


def round_robin(labels):
    """An order of positions that takes the classes in turn (the j-th of each class before any (j+1)-th), keeping
    the order within a class: a prefix of a class-sorted list becomes class-stratified; labels that already
    cycle keep their order."""
    seen, keys = {}, []
    for i, y in enumerate(labels):
        keys.append((seen.get(y, 0), y, i))
        seen[y] = seen.get(y, 0) + 1
    return [k[2] for k in sorted(keys)]


def balanced_subset(labels, n, seed=0):
    """n indices (all of them if n >= len), stratified by class, in ascending order."""
    return sorted(balanced_order(labels, seed)[:n])


def stratified_split(labels, test_fraction=0.2, seed=0):
    """(train, test) index lists: within each class a seeded test_fraction is held out (at least one image of
    every class with two or more)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(test_fraction * len(idx))) if len(idx) > 1 else 0
        test += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(test)
