"""SparseConv1d / SparseConv2d against the reference (``sparse_conv2d_backward_ref``), dense
convolutions at k = C_out, and the memory identities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import msbp
import msbp.native
from msbp import SparseBackpropConfig, SparseConv1d, SparseConv2d
from msbp.ops import scaling
from msbp.ops.reference import sparse_conv2d_backward_ref

F64 = {"rtol": 1e-10, "atol": 1e-12}


def make_conv(cls, c_in, c_out, config, *, seed=0, dtype=torch.float64, **kw):
    layer = cls(c_in, c_out, config=config, dtype=dtype, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    return layer


def step(layer, x, g):
    """One forward + backward: (dx, dW, db)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    layer(x).backward(g)
    db = None if layer.bias is None else layer.bias.grad.clone()
    return x.grad, layer.weight.grad.clone(), db


def spatial(layer, n, size, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, layer.in_channels) + (size,) * (2 if isinstance(layer, nn.Conv2d) else 1)
    dtype = layer.weight.dtype
    x = torch.randn(shape, generator=gen, dtype=dtype)
    with torch.no_grad():
        out_shape = layer.to_dense()(x).shape
    return x, torch.randn(out_shape, generator=gen, dtype=dtype)


GEOMETRIES = {
    "plain": dict(kernel_size=3),
    "stride-pad": dict(kernel_size=3, stride=2, padding=1),
    "dilated-nobias": dict(kernel_size=2, dilation=2, padding=1, bias=False),
    "groups2": dict(kernel_size=3, padding=1, groups=2),
}


@pytest.mark.parametrize("cls", [SparseConv2d, SparseConv1d], ids=["2d", "1d"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES), ids=list(GEOMETRIES))
@pytest.mark.parametrize("selection", ["unified", "random"])
@pytest.mark.parametrize("layout", ["unit", "slot"])
@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_matches_reference(cls, geometry, selection, layout, alpha, backend):
    kw = GEOMETRIES[geometry]
    config = SparseBackpropConfig(k=3, selection=selection, memory=alpha, memory_layout=layout)
    layer = make_conv(cls, 4, 8, config, **kw)
    layer.generator = torch.Generator().manual_seed(5)
    ref_gen = torch.Generator().manual_seed(5)
    memory = torch.zeros(8, dtype=torch.float64) if layout == "unit" else torch.zeros(
        0, 8, dtype=torch.float64
    )
    geo = dict(
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups
    )
    for t, n in enumerate([3, 3, 2]):  # the last batch changes shape: slot spreads its sums
        x, g = spatial(layer, n, 7, seed=t)
        dx, dW, db = step(layer, x, g)
        rdx, rdW, rdb, memory = sparse_conv2d_backward_ref(
            x, layer.weight.detach(), g, memory, k=3, selection=selection, alpha=alpha,
            layout=layout, generator=ref_gen, **geo,
        )
        torch.testing.assert_close(dx, rdx, **F64)
        torch.testing.assert_close(dW, rdW, **F64)
        if db is not None:
            torch.testing.assert_close(db, rdb, **F64)
        if alpha > 0:
            torch.testing.assert_close(layer.memory, memory, **F64)
        # compacted: k channels (ceil(k / groups) per group) reach dW
        kept = int((dW.flatten(1).abs().sum(1) > 0).sum())
        assert kept == layer.k == (4 if layer.groups == 2 else 3)


CASES = {
    "plain": (nn.Conv2d, dict(kernel_size=3)),
    "same-even-kernel": (nn.Conv2d, dict(kernel_size=4, padding="same")),
    "valid": (nn.Conv2d, dict(kernel_size=3, padding="valid", stride=2)),
    "reflect": (nn.Conv2d, dict(kernel_size=3, padding=1, padding_mode="reflect")),
    "circular": (nn.Conv2d, dict(kernel_size=3, padding=2, padding_mode="circular")),
    "depthwise": (nn.Conv2d, dict(kernel_size=3, padding=1, groups=8)),
    "conv1d-replicate": (nn.Conv1d, dict(kernel_size=3, padding=1, padding_mode="replicate")),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_k_out_equals_dense(case):
    dense_cls, kw = CASES[case]
    in_ch = 8
    dense = dense_cls(in_ch, 8, dtype=torch.float64, **kw)
    layer = msbp.sparsify(nn.Sequential(dense), SparseBackpropConfig(k=8, memory=0.8))[0]
    ref = dense_cls(in_ch, 8, dtype=torch.float64, **kw)
    ref.load_state_dict(dense.state_dict())
    x, g = spatial(layer, 2, 9, seed=1)
    got = step(layer, x, g)
    want = step(ref, x, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **F64)
    assert not layer.memory.any()
    # unbatched input, as nn.Conv2d takes it
    got = step(layer, x[0], g[0])
    want = step(ref, x[0], g[0])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_depthwise_stays_dense_and_reports_k():
    layer = SparseConv2d(6, 6, 3, groups=6, config=SparseBackpropConfig(k=2))
    assert layer.k == 6  # one channel per group: ceil(2 / 6) = 1 per group


@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_memory_one_loses_nothing(layout, backend):
    """alpha = 1: propagated + memory == everything that came in (channel sums). With C_in = 1,
    a 1x1 kernel and x = 1, dW[c] is exactly the propagated gradient summed over the rows."""
    config = SparseBackpropConfig(k=2, memory=1.0, memory_layout=layout)
    layer = make_conv(SparseConv2d, 1, 6, config, kernel_size=1)
    gen = torch.Generator().manual_seed(0)
    propagated = torch.zeros(6, dtype=torch.float64)
    incoming = torch.zeros(6, dtype=torch.float64)
    for _ in range(4):
        g = torch.randn(3, 6, 5, 5, generator=gen, dtype=torch.float64)
        _, dW, db = step(layer, torch.ones(3, 1, 5, 5, dtype=torch.float64), g)
        propagated += dW.flatten()
        incoming += g.sum((0, 2, 3))
        torch.testing.assert_close(db, g.sum((0, 2, 3)), **F64)  # bias stays dense
        mem = layer.memory if layout == "unit" else layer.memory.sum(0)
        torch.testing.assert_close(propagated + mem, incoming, **F64)


def test_memory_zero_is_plain_sparse():
    x, g = spatial(make_conv(SparseConv2d, 3, 6, None, kernel_size=3), 2, 6, seed=2)
    plain = make_conv(SparseConv2d, 3, 6, SparseBackpropConfig(k=2, memory=0.0), kernel_size=3)
    for _ in range(2):
        dx, dW, _ = step(plain, x, g)
        rdx, rdW, _, _ = sparse_conv2d_backward_ref(x, plain.weight.detach(), g, None, k=2)
        torch.testing.assert_close(dx, rdx, **F64)
        torch.testing.assert_close(dW, rdW, **F64)
        assert not plain.memory.any()


def test_memory_changes_once_per_backward():
    layer = make_conv(SparseConv2d, 3, 6, SparseBackpropConfig(k=2, memory=0.5), kernel_size=3)
    x, g = spatial(layer, 2, 6, seed=3)
    with torch.no_grad():
        layer(x)
    y = layer(x.requires_grad_(True))
    assert not layer.memory.any()  # forward never changes it
    y.backward(g)
    after_one = layer.memory.clone()
    assert after_one.any()
    # the same layer called twice in one graph: two updates, in backward order
    ref_memory = after_one
    for _ in range(2):
        *_, ref_memory = sparse_conv2d_backward_ref(
            x.detach(), layer.weight.detach(), g, ref_memory, k=2, alpha=0.5
        )
    (layer(x) + layer(x)).backward(g)
    torch.testing.assert_close(layer.memory, ref_memory, **F64)


def test_per_example_is_refused():
    with pytest.raises(ValueError, match="per_example.*not a|no longer a convolution"):
        SparseConv2d(3, 4, 3, config=SparseBackpropConfig(selection="per_example"))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Conv2d '0'.*per_example"):
        msbp.sparsify(model, SparseBackpropConfig(selection="per_example"))


def test_nonfinite_raise_and_skip(backend):
    layer = make_conv(SparseConv2d, 3, 6, SparseBackpropConfig(k=2), kernel_size=3)
    x, g = spatial(layer, 2, 6, seed=4)
    step(layer, x, g)
    before = layer.memory.clone()
    bad = g.clone()
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        step(layer, x, bad)
    torch.testing.assert_close(layer.memory, before, rtol=0, atol=0)
    layer.config = layer.config.replace(on_nonfinite="skip")
    dx, dW, _ = step(layer, x, bad)
    assert torch.isnan(dW).any() and torch.isnan(dx).any()
    torch.testing.assert_close(layer.memory, before, rtol=0, atol=0)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_nonfinite_keeps_slot_memory_of_another_batch_shape(backend, on_nonfinite):
    """A non-finite gradient at a new batch shape leaves a slot memory's rows and values."""
    config = SparseBackpropConfig(k=2, memory_layout="slot", on_nonfinite=on_nonfinite)
    layer = make_conv(SparseConv2d, 3, 6, config, kernel_size=3)
    step(layer, *spatial(layer, 2, 6, seed=4))
    before = layer.memory.clone()
    x, bad = spatial(layer, 3, 6, seed=5)
    bad[0, 1, 0, 0] = float("inf")
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            step(layer, x, bad)
    else:
        assert torch.isinf(step(layer, x, bad)[1]).any()  # dense
    torch.testing.assert_close(layer.memory, before, rtol=0, atol=0)


class _Scaler:
    def __init__(self, scale):
        self.scale = torch.tensor([scale], dtype=torch.float32)
        self.snapshots = []

    def get_scale_tensor(self):
        return self.scale

    def snapshot(self, memory):
        self.snapshots.append(memory.clone())


def test_grad_scaler_contract():
    """Under a scale s the gradient is s times larger; the memory stays in unscaled units."""
    config = SparseBackpropConfig(k=2, memory=0.8)
    plain = make_conv(SparseConv2d, 3, 6, config, kernel_size=3, dtype=torch.float32)
    scaled = make_conv(SparseConv2d, 3, 6, config, kernel_size=3, dtype=torch.float32)
    scaler = _Scaler(8.0)
    for seed in range(3):
        x, g = spatial(plain, 2, 6, seed=seed)
        _, dW, _ = step(plain, x, g)
        scaling.activate(scaler)
        try:
            _, dW_s, _ = step(scaled, x, g * 8)
        finally:
            scaling.deactivate(scaler)
        torch.testing.assert_close(dW_s / 8, dW, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scaled.memory, plain.memory, rtol=1e-5, atol=1e-5)
    assert len(scaler.snapshots) == 3


def test_sparsify_densify_dense_backward_and_state_dict():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Identity(), nn.Flatten(),
        nn.Linear(8 * 16, 4),
    )
    model = msbp.sparsify(model, SparseBackpropConfig(k=2))
    assert isinstance(model[0], SparseConv2d) and model[0].name == "0"
    x = torch.randn(2, 3, 4, 4)
    model(x).sum().backward()
    assert "0.memory" in model.state_dict()
    with msbp.dense_backward(model):
        (dw,) = torch.autograd.grad(model(x).sum(), [model[0].weight])
    assert int((dw.flatten(1).abs().sum(1) > 0).sum()) > 2  # dense there
    state = model.state_dict()
    model = msbp.densify(model)
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Linear
    again = msbp.sparsify(model, SparseBackpropConfig(k=2))
    again.load_state_dict(state)
    torch.testing.assert_close(again[0].memory, state["0.memory"])


def test_autocast_bf16_and_lazy_row_adam():
    model = msbp.sparsify(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(128, 2)),
        SparseBackpropConfig(k=2), exclude="2",
    )
    opt = msbp.optim.LazyRowAdam(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    with torch.autocast("cpu", torch.bfloat16):
        y = model(torch.randn(2, 3, 6, 6))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32
    opt.step()
    moved = (model[0].weight - before).flatten(1).abs().sum(1) > 0
    assert int(moved.sum()) == 2  # only the k propagated output channels are updated


def test_huge_finite_gradient_is_not_nonfinite(backend):
    """The backward checks the per-channel sums of |u| first; their overflow (finite entries
    near float32's max) must fall back to the entry-wise check, not raise."""
    layer = make_conv(SparseConv2d, 3, 6, SparseBackpropConfig(k=2), kernel_size=3,
                      dtype=torch.float32)
    x, g = spatial(layer, 2, 6, seed=4)
    huge = torch.full_like(g, 3e38)
    huge[:, 1] = -3e38
    step(layer, x, huge)  # would raise FloatingPointError on a wrong "non-finite"


@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_channels_last_matches_reference(layout, backend):
    """Channels-last inputs and gradients (the layout oneDNN is fastest on) give the same
    gradients and memory as the reference."""
    config = SparseBackpropConfig(k=3, memory=0.8, memory_layout=layout, selection="unified")
    layer = make_conv(SparseConv2d, 4, 8, config, kernel_size=3, padding=1)
    layer = layer.to(memory_format=torch.channels_last)
    memory = torch.zeros(8, dtype=torch.float64) if layout == "unit" else torch.zeros(
        0, 8, dtype=torch.float64
    )
    for t in range(2):
        x, g = spatial(layer, 3, 6, seed=t)
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
        dx, dW, _ = step(layer, x, g)
        rdx, rdW, _, memory = sparse_conv2d_backward_ref(
            x, layer.weight.detach(), g, memory, k=3, alpha=0.8, layout=layout,
            padding=(1, 1),
        )
        torch.testing.assert_close(dx, rdx, **F64)
        torch.testing.assert_close(dW, rdW, **F64)
        torch.testing.assert_close(layer.memory, memory, **F64)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_channel_sums(channels_last, dtype):
    """``msbp::conv_channel_sums`` (the fused scores and unit-memory sums) against PyTorch, with
    and without a shift, on spatial sizes that are not a multiple of its 8 lanes."""
    if not msbp.native.use_native():
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 5, 7, 3, generator=gen, dtype=dtype)
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    shift = torch.randn(5, generator=gen, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else F64
    for sh in (None, shift):
        u = g if sh is None else g + sh.view(1, 5, 1, 1)
        scores, sums = torch.ops.msbp.conv_channel_sums(g, sh, True)
        torch.testing.assert_close(scores, u.abs().sum((0, 2, 3)), **tol)
        torch.testing.assert_close(sums, u.sum((0, 2, 3)), **tol)
        assert scores.dtype == dtype


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_native_all_positions_active_equals_torch(channels_last, dtype):
    """``msbp::conv_all_positions_active`` is ``(g != 0).any(1).all()``: zero positions at the
    start, middle and end, a position that is zero but in its last channel, NaN counts."""
    if not msbp.native.use_native(torch.device("cpu")):
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 5, 4, 6, generator=gen).to(dtype)
    g[:, :4, 1, 2] = 0  # only the last channel is non-zero here
    cases = [g]
    for n, i, j in ((0, 0, 0), (1, 2, 3), (2, 3, 5)):
        z = g.clone()
        z[n, :, i, j] = 0
        cases.append(z)
        nan = z.clone()
        nan[n, 2, i, j] = float("nan")
        cases.append(nan)
    for case in cases:
        if channels_last:
            case = case.contiguous(memory_format=torch.channels_last)
        want = bool((case != 0).any(1).all())
        assert torch.ops.msbp.conv_all_positions_active(case) is want


def test_a_memory_sharing_its_own_storage_is_refused_at_the_call(backend):
    """An expand()ed memory failed only in backward ("more than one element of the written-to
    tensor refers to a single memory location"); now a ValueError at the call. Found by the
    malformed-input fuzz."""
    conv = SparseConv2d(3, 8, 3, config=SparseBackpropConfig(k=2, memory=0.5))
    conv.memory = torch.zeros(1).expand(8)
    with pytest.raises(ValueError, match="share storage"):
        conv(torch.randn(2, 3, 5, 5, requires_grad=True))


@pytest.mark.parametrize("groups", [1, 2])
def test_flop_counter_on_the_meta_device_counts_as_on_the_cpu(groups, backend):
    """Lightning's ``measure_flops`` builds the model on the meta device: the sparse
    convolution's backward failed there at its first host read ("Tensor.item() cannot be called
    on meta tensors"); it now runs the convolutions of k channels per group from shapes alone
    and counts what a CPU run counts, the memory untouched."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            torch.manual_seed(0)
            model = msbp.sparsify(
                nn.Sequential(nn.Conv2d(4, 8, 3, groups=groups), nn.Tanh(),
                              nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)),
                SparseBackpropConfig(k=4, memory=0.5), exclude="4",
            )
            x = torch.randn(3, 4, 8, 8)
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        counts[device] = counter.get_total_flops()
        assert model[0].weight.grad.shape == (8, 4 // groups, 3, 3)
        assert model[0].weight.grad.device.type == device
        assert model[0].memory.device.type == device
    assert counts["meta"] == counts["cpu"] > 0


def test_an_input_on_another_device_than_the_weight_is_refused_at_the_call(backend):
    """torch.convolution takes a meta input with a CPU weight (nn.Conv2d's forward runs); the
    sparse backward then failed ("index_copy(): self, index and source expected to be in the
    same device"). Now a ValueError at the call naming both devices. Found by the
    malformed-input fuzz."""
    conv = SparseConv2d(3, 8, 3, config=SparseBackpropConfig(k=2, memory=0.5))
    with pytest.raises(ValueError, match="is on meta but the weight is on cpu"):
        conv(torch.randn(2, 3, 5, 5, device="meta", requires_grad=True))
