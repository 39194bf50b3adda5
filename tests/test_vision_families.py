"""timm and torchvision vision families train sparsified as they come: `sparsify` converts every
linear layer and convolution (grouped and depthwise ones too, and torchvision's
`nn.MultiheadAttention`), at k = out the sparsified model trains exactly as the dense one, the
native kernels and the PyTorch path compute the same step, and evaluation is the dense model's.
Runs only where timm and torchvision are installed (not in CI)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import assert_steps_alike, assert_trains_as_dense, on_both_backends, train_records
from torch import nn

import msbp
from msbp import SparseBackpropConfig

try:
    import timm
    import torchvision
except Exception as error:  # noqa: BLE001  not installed, or (RuntimeError) a torchvision
    # built for another torch (PyPI's CUDA wheel beside a CPU torch fails to register its ops)
    pytest.skip(f"timm and torchvision not importable: {error!r}", allow_module_level=True)

CFG = SparseBackpropConfig(ratio=0.25, memory=0.8)
CLASSES = 3
SIZE = 32


def _timm_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES,
                             img_size=SIZE, patch_size=8, depth=1, embed_dim=16, num_heads=2)


def _timm_convnext():
    # depthwise 7x7 convolutions, channels-last linear layers
    return timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES,
                             depths=(1, 1, 1, 1), dims=(8, 8, 16, 16))


def _timm_swinv2():
    # its position-bias MLP is Linear -> ReLU(inplace=True) on a 4-d input; its qkv layer,
    # with q and v biases, runs as F.linear(x, qkv.weight, bias) unless sparsify sets timm's
    # qkv_bias_separate
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=CLASSES,
                              img_size=SIZE, patch_size=4, window_size=4, embed_dim=8,
                              depths=(1, 1), num_heads=(1, 2))
    # its residual post-norms start at zero, which leaves attention without a gradient
    for name, module in model.named_modules():
        if name.endswith((".norm1", ".norm2")):
            nn.init.ones_(module.weight)
    return model


def _tv_vit():
    # nn.MultiheadAttention (batch_first) becomes a SparseMultiheadAttention
    return torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=24,
        num_classes=CLASSES,
    )


def _tv_mobilenet():
    # grouped / depthwise convolutions, squeeze-excitation 1x1 convolutions, Hardswish
    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES, width_mult=0.25)


FAMILIES = {
    "timm_vit": _timm_vit,
    "timm_convnext": _timm_convnext,
    "timm_swinv2": _timm_swinv2,
    "torchvision_vit": _tv_vit,
    "torchvision_mobilenet_v3": _tv_mobilenet,
}
KINDS = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FAMILIES[name]().double()
    return model.train()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, SIZE, SIZE, generator=gen, dtype=torch.float64),
            torch.randint(0, CLASSES, (4,), generator=gen))


def _train(model: nn.Module, steps: int = 2, optimizer=torch.optim.Adam) -> list[dict]:
    """Steps on fixed batches; the loss, gradients and memories after each backward."""
    torch.manual_seed(1)  # stochastic depth draws the same masks for every model

    def loss_at(step: int) -> torch.Tensor:
        x, y = _batch(step)
        return nn.functional.cross_entropy(model(x), y)

    return train_records(model, loss_at, steps, optimizer)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_linear_layer_and_convolution_is_converted(name):
    model = _model(name)
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    layers = {
        n for n, m in model.named_modules()
        if isinstance(m, KINDS) and not any(n.startswith(a + ".") for a in attention)
    }
    msbp.sparsify(model, CFG)
    assert set(model.sparsify_report.converted) == layers
    assert not model.sparsify_report.dense
    assert not any(type(m) in KINDS for m in model.modules())


@pytest.mark.parametrize("name", FAMILIES)
def test_k_equal_to_out_trains_as_the_dense_model(name):
    dense, sparse = _model(name), msbp.sparsify(_model(name), CFG.replace(ratio=1.0))
    assert_trains_as_dense(dense, sparse, _train(dense), _train(sparse))


@pytest.mark.parametrize("name", FAMILIES)
def test_native_and_pytorch_paths_train_alike(name):
    config = CFG.replace(memory_rows="all")
    assert_steps_alike(*on_both_backends(lambda: _train(
        msbp.sparsify(_model(name), config), optimizer=msbp.optim.LazyRowAdam
    )))


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_is_the_dense_model_and_densify_loads_into_a_fresh_one(name):
    model = msbp.sparsify(_model(name), CFG)
    _train(model, steps=1, optimizer=msbp.optim.LazyRowAdam)
    model.eval()
    x, _ = _batch(5)
    with torch.no_grad():
        sparse_out = model(x)
        fresh = _model(name).eval()
        for module in fresh.modules():  # as sparsify set it (the bias added after qkv)
            if hasattr(module, "qkv_bias_separate"):
                module.qkv_bias_separate = True
        fresh.load_state_dict(msbp.densify(model).state_dict())
        assert torch.equal(sparse_out, fresh(x))


def _timm_beit():
    return timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=CLASSES,
                             img_size=SIZE, patch_size=8, depth=1, embed_dim=16, num_heads=2)


def _timm_eva():
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=CLASSES,
                             img_size=28, patch_size=14, depth=1, embed_dim=16, num_heads=2)


def _timm_mobilenet():
    # its classifier is a timm.layers.Linear
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=CLASSES)


def _tv_swin():
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        num_classes=CLASSES,
    )


@pytest.mark.parametrize("make", [_timm_swinv2, _timm_beit, _timm_eva, _timm_mobilenet, _tv_swin])
def test_no_converted_linear_layer_trains_dense_unseen(make):
    """A layer whose weight its model hands to a functional call never runs sparse: sparsify
    sets timm's qkv_bias_separate so that it does, and leaves torchvision Swin's dense. With
    unified selection every converted linear layer writes at most k rows of its gradient."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make().double().train()
        msbp.sparsify(model, CFG)
    size = 28 if make is _timm_eva else SIZE
    model(torch.randn(2, 3, size, size, dtype=torch.float64)).logsumexp(-1).sum().backward()
    linear = {n: m for n, m in model.named_modules() if isinstance(m, msbp.SparseLinear)}
    assert linear
    for name, layer in linear.items():
        if layer.weight.grad is not None:
            rows = int((layer.weight.grad != 0).any(1).sum())
            assert rows <= layer.k, f"{name}: {rows} rows written, k = {layer.k}"
    if make is _tv_swin:
        assert {n.rsplit(".", 1)[-1] for n in model.sparsify_report.unsupported} == {"qkv", "proj"}
    else:
        assert not model.sparsify_report.dense
