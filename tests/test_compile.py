"""Compile readiness: every trained model compiles with fullgraph=True (a graph break raises) for forward and
backward, at tiny size on CPU, and gives the eager result. The aot_eager backend traces the forward and the
backward graphs through AOTAutograd exactly as inductor receives them, without the C++ code generation."""
import pytest
import torch

from diffusion import DiT, make_config as dit_config
from discriminator import Discriminator, DinoDiscTrunk, ProxyDiscTrunk, dino_discriminator
from mactok import MacTok
from pretrained import ViTConfig
from proxy import ProxyConfig, ProxyNet
from tokenizer import build, make_config

pytestmark = pytest.mark.slow  # about 50 s on 2 cores: tracing forward and backward of eight models


def _check(model, run, inputs):
    """run(module, *inputs) -> a scalar loss: compiled with fullgraph equals eager, gradients included."""
    state = {k: v.clone() for k, v in model.state_dict().items()}  # spectral norm / BatchNorm update buffers
    torch.manual_seed(0)
    ref = run(model, *inputs)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out = run(compiled, *inputs)
    out.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_maetok_training_forward_and_backward_compile():
    torch.manual_seed(0)
    model = build(make_config("tiny", aux_targets=("hog",))).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _check(model, lambda m, x, mask: m(x, mask)["loss"], (x, model.sample_mask(2, "cpu")))


@pytest.mark.parametrize("mask_tokens", ["image", "latent"])
def test_mactok_training_forward_and_backward_compile(mask_tokens):
    torch.manual_seed(0)
    model = build(make_config("MacTok-tiny", align=("local", "global"), mask_tokens=mask_tokens,
                              semantic_mask_prob=0.5)).train()
    assert isinstance(model, MacTok)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    c = model.cfg
    teacher = {"cls": torch.randn(2, c.teacher_dim), "patches": torch.randn(2, c.num_patches, c.teacher_dim)}
    mask = model.sample_mask(2, "cpu", teacher=teacher)
    _check(model, lambda m, x, mask, t: m(x, mask, t)["loss"], (x, mask, teacher))


@pytest.mark.parametrize("over", [
    dict(),                                                                          # SiT, 1D tokens
    dict(grid=(4, 4), num_tokens=16, norm="rmsnorm", ffn="swiglu", rope=True, qk_norm=True),  # LightningDiT
    dict(grid=(4, 4), num_tokens=16, patch_size=2, learn_sigma=True, sit_time=True),  # released SiT-XL/2 layout
])
def test_denoiser_training_forward_and_backward_compile(over):
    torch.manual_seed(0)
    cfg = {"num_tokens": 8, **over}
    model = DiT(dit_config("tiny", in_channels=4, num_classes=5, **cfg)).train()
    with torch.no_grad():  # off the adaLN-Zero init so every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, model.cfg.num_tokens, 4), torch.rand(2), torch.tensor([1, 3])
    _check(model, lambda m, x, t, y: m(x, t, y).square().mean(), (x, t, y))


def test_discriminators_compile():
    torch.manual_seed(0)
    trunk = DinoDiscTrunk(ViTConfig(48, 3, 3, patch_size=16, img_size=224, layerscale=False), key_depths=(0, 2))
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # under 224 px: resized, no random crop (a CPU draw at 256 px)
    _check(dino_discriminator(trunk), lambda d, x: d(x).square().mean(), (x,))
    proxy = ProxyDiscTrunk(ProxyNet(ProxyConfig(width=8)))
    _check(Discriminator(proxy, proxy.dims), lambda d, x: d(x).square().mean(), (x,))


def test_proxy_classifier_compiles():
    torch.manual_seed(0)
    net = ProxyNet(ProxyConfig(width=8)).train()
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3])
    _check(net, lambda n, x, y: torch.nn.functional.cross_entropy(n(x), y), (x, y))


def test_attention_reaches_sdpa_in_bf16_without_masks(monkeypatch):
    """Flash attention needs q, k, v of one half dtype and no mask: under bf16 autocast every attention call of
    the tokenizers and denoisers (RoPE applied in fp32 and cast back) gets exactly that."""
    import torch.nn.functional as F
    import vit
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(({q.dtype, k.dtype, v.dtype}, args, kwargs))
        return sdpa(q, k, v, *args, **kwargs)
    monkeypatch.setattr(vit.F, "scaled_dot_product_attention", spy)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lightning = DiT(dit_config("tiny", in_channels=4, num_tokens=16, grid=(4, 4), num_classes=5, norm="rmsnorm",
                               ffn="swiglu", rope=True, qk_norm=True))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model = build(make_config("tiny", aux_targets=("hog",)))
        model(x, model.sample_mask(2, "cpu"))
        build(make_config("MacTok-tiny"))(x)
        lightning(torch.randn(2, 16, 4), torch.rand(2), torch.tensor([0, 1]))
    assert len(calls) > 10
    assert all(dtypes == {torch.bfloat16} and not args and not kwargs for dtypes, args, kwargs in calls), calls[:3]


def test_adaptive_weight_under_compile_skips_the_compiled_backward():
    """The GAN's lambda differentiates w.r.t. the pixel decoder's last weight. With that layer kept out of the
    compiled graph (engine.keep_eager, as train_tokenizer.py --compile does), lambda runs only the small backward
    graphs after it, never the trunk's, and equals the eager lambda."""
    import copy
    from torch._dynamo.backends.common import aot_autograd
    import engine
    from discriminator import GANLoss, NLayerDiscriminator
    torch.manual_seed(0)
    model = build(make_config("tiny", aux_targets=())).train()
    eager = copy.deepcopy(model)
    gan = GANLoss(NLayerDiscriminator(), 0, 0.5, 0.0, 0.0, augment=False, d_weight=1.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    calls = []

    def counting_bw(gm, example_inputs):
        n = len(gm.graph.nodes)

        def run(args):
            calls.append(n)
            return gm(*args)
        run._boxed_call = True
        return run

    def lam(fwd, m):
        out = fwd(x, None)
        calls.clear()
        _, logs = gan.generator_term(out["rec"], out["pixel"], m.last_layer)
        seen = list(calls)
        out["loss"].backward()
        return logs["d_weight"], seen, list(calls)

    ref, _, _ = lam(eager, eager)
    torch._dynamo.reset()
    engine.keep_eager(model, [model.last_layer])
    got, during, full = lam(torch.compile(model, backend=aot_autograd(fw_compiler=lambda gm, ex: gm,
                                                                       bw_compiler=counting_bw)), model)
    torch._dynamo.reset()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert full and max(during, default=0) < max(full)                  # the trunk's backward ran only once
