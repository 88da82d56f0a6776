"""Shared test helpers. Run the suite with:  python -m pytest -q tests"""
import math
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "tests" / "golden"  # conformance fixtures of the official code (tests/golden/PROVENANCE.md)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def offline(monkeypatch):
    """No network, as on the machines without internet: every official download fails."""
    def fail(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)


def golden(name):
    """Load a conformance fixture from tests/golden; skip when it is absent, fail if NANOTOK_REQUIRE_GOLDEN=1."""
    path = GOLDEN / name
    if not path.exists():
        if os.environ.get("NANOTOK_REQUIRE_GOLDEN") == "1":
            pytest.fail(f"golden fixture {path} is missing and NANOTOK_REQUIRE_GOLDEN=1")
        pytest.skip(f"golden fixture {path} not found")
    return torch.load(path, weights_only=True)


def golden_tensor(key, shape):
    """The fixtures' weight rule (tests/golden/PROVENANCE.md), verbatim in behaviour."""
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    last = key.rsplit(".", 1)[-1]
    if last == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.long)
    if last == "running_var":
        return 0.5 + torch.rand(shape, generator=g)
    if last == "running_mean":
        return 0.1 * torch.randn(shape, generator=g)
    if last in ("cls_token", "pos_embed", "register_tokens", "reg_token", "mask_token", "dist_token"):
        return torch.randn(shape, generator=g)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
    if last in ("weight", "gamma"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)
