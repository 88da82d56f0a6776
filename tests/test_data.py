"""Datasets, transforms and deterministic sampling."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image

import data


def test_to_rgb_handles_modes():
    assert data.to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert data.to_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert data.to_rgb(Image.new("P", (4, 4))).mode == "RGB"
    g16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))  # 16-bit gray is rescaled, not clipped
    assert data.to_rgb(g16).getpixel((0, 0)) == (255, 255, 255)
    g16 = Image.fromarray(np.full((4, 4), 257 * 100, np.uint16))
    assert data.to_rgb(g16).getpixel((0, 0)) == (100, 100, 100)


def test_builtin_is_deterministic_labeled_and_any_size():
    a, b = data.BuiltinSource(32, 20), data.BuiltinSource(32, 20)
    assert np.array_equal(np.asarray(a.load(3)), np.asarray(b.load(3)))
    assert not np.array_equal(np.asarray(a.load(3)), np.asarray(a.load(13)))  # same class, other pose
    assert a.num_classes >= 10 and a.labels[:10] == list(range(10))
    val = data.BuiltinSource(32, 20, split="val")
    assert not np.array_equal(np.asarray(val.load(3)), np.asarray(a.load(3)))
    for s in (32, 64, 256):
        assert data.BuiltinSource(s, 1).load(0).size == (s, s)
    with pytest.raises(ValueError):
        data.BuiltinSource(16, 1)


def test_builtin_classes_are_shapes_not_colours():
    # the mean colour of an image carries (almost) no class information: the shape does
    src = data.BuiltinSource(32, 400)
    means = np.stack([np.asarray(src.load(i), np.float64).mean((0, 1)) for i in range(400)])
    labels = np.array(src.labels)
    per_class = np.stack([means[labels == c].mean(0) for c in range(10)])
    assert per_class.std(0).max() < 0.5 * means.std(0).min()


def test_builtin_shapes_fit_and_differ():
    # every shape stays inside the image at the largest scale and centre offset, and
    # no two classes coincide under any rotation or mirror (pairwise IoU of the best-aligned masks < 0.9)
    n = 64
    Y, X = (np.mgrid[0:n, 0:n] + 0.5) / n * 2.4 - 1.2                       # unit frame, [-1.2, 1.2]
    k = len(data.BUILTIN_CLASSES)
    masks = [data._shape_mask(c, X, Y) for c in range(k)]
    for m in masks:
        assert m.mean() > 0.05 and np.hypot(X, Y)[m].max() * data.BUILTIN_SCALE[1] + data.BUILTIN_OFFSET < 0.5
    for a in range(k):
        for b in range(a + 1, k):
            best = 0.0
            for t in np.linspace(0, 2 * np.pi, 36, endpoint=False):
                u, v = np.cos(t) * X + np.sin(t) * Y, -np.sin(t) * X + np.cos(t) * Y
                for mb in (data._shape_mask(b, u, v), data._shape_mask(b, -u, v)):
                    best = max(best, (masks[a] & mb).sum() / (masks[a] | mb).sum())
            assert best < 0.9, (data.BUILTIN_CLASSES[a], data.BUILTIN_CLASSES[b], best)


def test_transforms():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    assert data.center_crop_arr(img, 32).size == (32, 32)
    rng = np.random.default_rng(0)
    x = data.transform(img, 32, True, rng)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    sq = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    assert data.center_crop_arr(sq, 64).size == (64, 64)
    assert np.array_equal(np.asarray(data.center_crop_arr(sq, 64)), np.asarray(sq))
    u8 = data.to_uint8(data.to_tensor(sq)[None])[0].numpy()
    assert np.array_equal(u8, np.asarray(sq))  # to_tensor / to_uint8 round trip is exact


def test_rank_indices_partition_and_shuffle():
    parts = [data.rank_indices(10, 0, 0, r, 3) for r in range(3)]
    assert all(len(p) == 4 for p in parts) and set(sum(parts, [])) == set(range(10))
    assert parts == [data.rank_indices(10, 0, 0, r, 3) for r in range(3)]
    assert data.rank_indices(10, 1, 0, 0, 1) != data.rank_indices(10, 0, 0, 0, 1)
    b = data.epoch_batches(10, 0, 0, 0, 1, 4, start=1)
    assert len(b) == 1 and all(e == 0 for _, e in b[0])


def _write_folder(root):
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, "JPEG")
    (root / "cats" / "truncated.jpg").write_bytes(buf.getvalue()[:100])
    (root / "dogs" / "notes.txt").write_text("not an image")


def test_imagefolder_labels_and_corrupt_files_skipped(tmp_path):
    _write_folder(tmp_path)
    src = data.ImageFolderSource(str(tmp_path))
    assert src.classes == ["cats", "dogs"] and len(src) == 8
    ds = data.ImageDataset(src, 32, train=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items = [ds[(i, 0)] for i in range(len(ds))]
    assert sum(s for *_, s in items) == 2 and len(w) == 2 and "skipping unreadable image" in str(w[0].message)
    assert all(x.shape == (3, 32, 32) for x, *_ in items)
    assert sorted({y for _, y, _ in items}) == [0, 1]


def test_flat_folder_npz_and_errors(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert data.ImageFolderSource(str(tmp_path)).num_classes == 1
    np.savez(tmp_path / "x.npz", np.zeros((5, 8, 8, 3), np.uint8), np.arange(5))
    src = data.build_source(str(tmp_path / "x.npz"), 8)
    assert len(src) == 5 and src.labels == [0, 1, 2, 3, 4] and src.load(0).size == (8, 8)
    np.savez(tmp_path / "y.npz", np.zeros((5, 8, 8, 3), np.uint8))
    assert data.NpzSource(str(tmp_path / "y.npz")).labels == [0] * 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        data.ImageFolderSource(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.build_source(str(tmp_path / "missing"), 8)


def _class_sorted_folder(root, sizes=(20, 20, 10)):
    """An ImageFolder whose classes are solid red / green / blue (with noise): linearly separable."""
    rng = np.random.default_rng(0)
    for c, n in enumerate(sizes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            arr = np.full((32, 32, 3), 30, np.float64)
            arr[..., c] = 220
            arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i:03d}.png")
    return root


def test_subsets_of_a_class_sorted_folder_cover_every_class(tmp_path):
    src = data.ImageFolderSource(str(_class_sorted_folder(tmp_path)))
    assert src.labels == sorted(src.labels)  # ImageFolder order: the first n images are one or two classes
    sub = data.balanced_subset(src.labels, 10, seed=0)  # e.g. the held-out PSNR images, the picture grid
    assert [src.labels[i] for i in sub].count(2) == 2 and {src.labels[i] for i in sub} == {0, 1, 2}
    assert data.balanced_subset(src.labels, 10, seed=0) == sub and data.balanced_subset(src.labels, 99) == list(range(50))
    tr, te = data.stratified_split(src.labels, 0.2, seed=0)
    assert sorted(tr + te) == list(range(50)) and [src.labels[i] for i in te].count(0) == 4
    assert {src.labels[i] for i in te} == {0, 1, 2} == {src.labels[i] for i in tr}
    held = data.SubsetSource(src, te)
    assert len(held) == 10 and held.labels == [src.labels[i] for i in te] and held.files[0] == src.files[te[0]]


def test_round_robin_makes_prefixes_of_a_class_sorted_list_stratified():
    """evaluate.py diffusability takes the first n held-out images for its costlier metrics: on a class-sorted
    folder the round-robin order puts every class in that prefix; cycling labels keep their order."""
    from data import round_robin
    sorted_labels = [c for c in range(5) for _ in range(4)]                   # 0 0 0 0 1 1 1 1 ...
    order = round_robin(sorted_labels)
    assert sorted(order) == list(range(20)) and [sorted_labels[i] for i in order[:5]] == [0, 1, 2, 3, 4]
    assert [sorted_labels[i] for i in order[:10]].count(2) == 2
    cycling = [i % 5 for i in range(20)]
    assert round_robin(cycling) == list(range(20))
