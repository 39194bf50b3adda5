"""Memory as layer state: state_dict round trips, dense checkpoints, layout conversion."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _helpers import LAYOUTS, fast_step, make_layer, memory_colsum, randn, ref_step, tol
from torch import nn

import msbp
from msbp import SparseBackpropConfig, SparseLinear, SparseLSTM, sparsify


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    ).double()


def _batches(n_steps: int):
    gen = torch.Generator().manual_seed(123)
    sizes = [5, 5, 4, 5, 6, 5, 3, 5, 5, 5]
    return [
        (
            randn(sizes[i % len(sizes)], 6, gen=gen),
            torch.randint(0, 3, (sizes[i % 10],), generator=gen),
        )
        for i in range(n_steps)
    ]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _save(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_round_trip_resumes_exactly(selection, layout):
    cfg = SparseBackpropConfig(
        ratio=None, k=3, selection=selection, memory=0.8, memory_layout=layout
    )
    batches = _batches(10)

    straight = sparsify(_mlp(0), cfg, exclude="4")
    opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    _train(straight, opt, batches)

    first = sparsify(_mlp(0), cfg, exclude="4")
    opt1 = torch.optim.Adam(first.parameters(), lr=1e-2)
    _train(first, opt1, batches[:5])
    assert first[0].memory.any() and first[2].memory.any()
    buf = _save({"model": first.state_dict(), "opt": opt1.state_dict()})

    resumed = sparsify(_mlp(7), cfg, exclude="4")  # other initial weights, zero memory
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    ckpt = torch.load(buf, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for a, b in zip(resumed.state_dict().values(), first.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    _train(resumed, opt2, batches[5:])

    sd_a, sd_b = straight.state_dict(), resumed.state_dict()
    assert set(sd_a) == set(sd_b)
    assert {"0.memory", "2.memory"} <= set(sd_a)
    for key in sd_a:
        assert sd_a[key].shape == sd_b[key].shape, key
        assert torch.equal(sd_a[key], sd_b[key]), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_in_state_dict_and_loaded(layout):
    cfg = SparseBackpropConfig(ratio=None, k=2, memory=0.8, memory_layout=layout)
    src = make_layer(4, 6, cfg)
    gen = torch.Generator().manual_seed(0)
    fast_step(src, randn(3, 4, gen=gen), randn(3, 6, gen=gen))
    sd = src.state_dict()
    assert set(sd) == {"weight", "bias", "memory"}
    dst = make_layer(4, 6, cfg, seed=5)
    dst.load_state_dict(sd)
    assert dst.memory.shape == src.memory.shape
    assert torch.equal(dst.memory, src.memory)
    assert dst.memory.data_ptr() != src.memory.data_ptr()


def test_dense_checkpoint_loads_into_sparse_model():
    dense = _mlp(0)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    _train(dense, opt, _batches(2))
    sd = dense.state_dict()
    for layout in LAYOUTS:
        model = sparsify(_mlp(3), SparseBackpropConfig(k=2, memory_layout=layout))
        # give the memory something to forget first
        fast_step(model[0], randn(4, 6, gen=gen), randn(4, 16, gen=gen))
        assert model[0].memory.any()
        result = model.load_state_dict(sd)  # strict: no missing-key error for the memory
        assert not result.missing_keys and not result.unexpected_keys
        for name, p in dense.named_parameters():
            assert torch.equal(model.get_parameter(name), p)
        for i in (0, 2, 4):
            assert not model[i].memory.any()
            model[i].check_memory()


def test_sparse_checkpoint_into_dense_model_needs_non_strict():
    model = sparsify(_mlp(0), SparseBackpropConfig(k=2))
    dense = _mlp(1)
    with pytest.raises(RuntimeError, match="memory"):
        dense.load_state_dict(model.state_dict())
    result = dense.load_state_dict(model.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == ["0.memory", "2.memory", "4.memory"]


@pytest.mark.parametrize(
    ("saved", "loaded"), [("slot", "unit"), ("unit", "slot")], ids=["slot->unit", "unit->slot"]
)
def test_layout_conversion_on_load_keeps_column_sums(saved, loaded):
    base = dict(ratio=None, k=2, memory=0.8)
    src = make_layer(4, 6, SparseBackpropConfig(**base, memory_layout=saved))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        fast_step(src, randn(3, 4, gen=gen), randn(3, 6, gen=gen))
    assert src.memory.any()
    cfg = SparseBackpropConfig(**base, memory_layout=loaded)
    dst = make_layer(4, 6, cfg, seed=9)
    dst.load_state_dict(src.state_dict())
    dst.check_memory()
    assert dst.memory.dim() == (1 if loaded == "unit" else 2)
    torch.testing.assert_close(memory_colsum(dst.memory), memory_colsum(src.memory))
    # and the next step uses it as the reference would
    x, g = randn(5, 4, gen=gen), randn(5, 6, gen=gen)
    mem = dst.memory.clone()
    dx, dW, db = fast_step(dst, x, g)
    rdx, rdW, _, rmem = ref_step(cfg, x, dst.weight, g, mem)
    torch.testing.assert_close(dx, rdx, **tol(torch.float64))
    torch.testing.assert_close(dW, rdW, **tol(torch.float64))
    torch.testing.assert_close(dst.memory, rmem, **tol(torch.float64))


def test_slot_memory_of_other_batch_size_loads():
    cfg = SparseBackpropConfig(ratio=None, k=2, memory=0.8, memory_layout="slot")
    src = make_layer(4, 6, cfg)
    gen = torch.Generator().manual_seed(0)
    fast_step(src, randn(7, 4, gen=gen), randn(7, 6, gen=gen))
    dst = make_layer(4, 6, cfg)
    fast_step(dst, randn(2, 4, gen=gen), randn(2, 6, gen=gen))
    dst.load_state_dict(src.state_dict())
    assert dst.memory.shape == (7, 6)
    assert torch.equal(dst.memory, src.memory)


def test_load_float32_checkpoint_into_float64_layer():
    cfg = SparseBackpropConfig(ratio=None, k=2, memory=0.8)
    src = make_layer(4, 6, cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    fast_step(
        src, randn(3, 4, gen=gen, dtype=torch.float32), randn(3, 6, gen=gen, dtype=torch.float32)
    )
    dst = make_layer(4, 6, cfg, dtype=torch.float64)
    dst.load_state_dict(src.state_dict())
    assert dst.memory.dtype == torch.float64
    torch.testing.assert_close(dst.memory, src.memory.double(), rtol=0, atol=0)


def test_from_dense_layer_keeps_state_dict_keys():
    lin = nn.Linear(4, 6)
    layer = SparseLinear.from_dense(lin)
    assert set(layer.state_dict()) == set(lin.state_dict()) | {"memory"}


# -- the memory is layer state, not a buffer (DDP must never broadcast it) ---------------------


def _trained_layer(layout="unit") -> SparseLinear:
    layer = make_layer(4, 6, SparseBackpropConfig(ratio=None, k=2, memory=0.8,
                                                  memory_layout=layout))
    gen = torch.Generator().manual_seed(0)
    fast_step(layer, randn(3, 4, gen=gen), randn(3, 6, gen=gen))
    assert layer.memory.any()
    return layer


def test_memory_is_state_but_not_a_buffer():
    layer = _trained_layer()
    assert "memory" not in dict(layer.named_buffers())
    assert dict(layer.named_memories()) == {"memory": layer.memory}
    assert list(layer.state_dict()) == ["weight", "bias", "memory"]
    assert layer.state_dict(keep_vars=True)["memory"] is layer.memory
    saved = layer.state_dict()["memory"]
    assert torch.equal(saved, layer.memory) and not saved.requires_grad


def test_wrong_memory_shape_is_a_load_error():
    layer = _trained_layer()
    sd = layer.state_dict()
    sd["memory"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"size mismatch for memory: saved memory of shape"):
        layer.load_state_dict(sd)
    slot = _trained_layer("slot")
    sd = slot.state_dict()
    sd["memory"] = torch.zeros(3, 7)
    with pytest.raises(RuntimeError, match=r"size mismatch for memory"):
        slot.load_state_dict(sd)


def test_share_memory_and_module_pickled_with_a_memory_buffer():
    layer = _trained_layer()
    before = layer.memory.clone()
    layer.share_memory()
    assert layer.memory.is_shared() and torch.equal(layer.memory, before)
    # a module pickled whole by an older msbp, whose memory was a registered buffer
    old = _trained_layer()
    memory = old.__dict__.pop("memory")
    old._buffers["memory"] = memory
    loaded = torch.load(_save(old), weights_only=False)
    assert "memory" not in loaded._buffers and torch.equal(loaded.memory, memory)
    assert torch.equal(loaded.state_dict()["memory"], memory)


def test_shared_layer_saves_and_loads_under_both_names():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).double()
    model = sparsify(nn.Sequential(shared, nn.Tanh(), shared), SparseBackpropConfig(k=2))
    model(randn(3, 4, gen=torch.Generator().manual_seed(0))).sum().backward()
    sd = model.state_dict()
    assert torch.equal(sd["0.memory"], sd["2.memory"]) and sd["0.memory"].any()
    twin = copy.deepcopy(model)
    assert twin[0] is twin[2] and twin[0].memory is twin[2].memory
    assert twin[0].memory.data_ptr() != model[0].memory.data_ptr()
    fresh = sparsify(nn.Sequential(*(lambda s: (s, nn.Tanh(), s))(nn.Linear(4, 4).double())),
                     SparseBackpropConfig(k=2))
    fresh.load_state_dict(sd)
    assert fresh[0] is fresh[2] and torch.equal(fresh[0].memory, model[0].memory)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_assign_load_into_meta_model(layout):
    src = _trained_layer(layout)
    cfg = src.config
    with torch.device("meta"):
        dst = SparseLinear(4, 6, config=cfg, dtype=torch.float64)
    assert dst.memory.is_meta
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst.weight.device.type == "cpu" and dst.memory.device.type == "cpu"
    assert dst.memory.dtype == torch.float64 and torch.equal(dst.memory, src.memory)
    dst.check_memory()


class _Mixed(nn.Module):
    """A linear layer, a convolution, an LSTM and an attention module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (N, 3, T)
        h = self.lstm(self.conv(x).transpose(1, 2))[0]
        return self.head(self.attn(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_of_a_model_built_on_meta_materialises_empty(backend, layout):
    """``to_empty()`` of a model sparsified on the meta device (the usual way to build a large
    model, then initialise or load it) gives parameters uninitialised storage, to be filled by
    their init; the memory, which held nothing on the meta device, starts empty. It used to
    get uninitialised storage too, and whatever the allocator left there went into the first
    backward's gradients. Found while fuzzing save/convert paths."""
    cfg = SparseBackpropConfig(k=2, memory=0.8, memory_layout=layout)
    torch.manual_seed(0)
    ref = sparsify(_Mixed(), cfg)
    with torch.device("meta"):
        model = sparsify(_Mixed(), cfg)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # and torch.empty fills with NaN: never zeros
    try:
        model.to_empty(device="cpu")
    finally:
        torch.use_deterministic_algorithms(deterministic)
    with torch.no_grad():  # an init by hand, not a state dict (which would set the memory)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            p.copy_(q)
    for name, memory in msbp.memory_state_dict(model).items():
        assert not memory.any(), name
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    for m in (model, ref):
        m(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_slot_memory_whose_storage_cannot_grow_still_takes_a_larger_batch(backend):
    """``Tensor.numpy()`` of a state dict (``np.savez``, a checksum; the CLI's checkpoint digest
    did it) leaves a slot memory's storage unable to grow: the next
    larger batch raised "Trying to resize storage that is not resizable", and the memory was
    left claiming rows it had no storage for, so that the next call crashed the process
    (segmentation fault). The layer now takes a copy that can grow; the run equals a copy of
    the model that was never touched. Found by a resume fuzz of the command line."""
    cfg = SparseBackpropConfig(k=2, memory=0.8, memory_layout="slot")
    torch.manual_seed(0)
    model = sparsify(_Mixed(), cfg)
    gen = torch.Generator().manual_seed(1)
    model(torch.randn(2, 3, 4, generator=gen)).square().sum().backward()
    twin = copy.deepcopy(model)
    for value in model.state_dict().values():
        value.numpy()
    assert not model.head.memory.untyped_storage().resizable()
    x = torch.randn(3, 3, 5, generator=gen)  # more rows: every slot memory grows
    for _ in range(2):
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            m(x).square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
        for (key, a), b in zip(msbp.memory_state_dict(model).items(),
                               msbp.memory_state_dict(twin).values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    # loading a state dict with more rows into such a memory
    small = sparsify(_Mixed(), cfg)
    small(torch.randn(1, 3, 2, generator=gen)).square().sum().backward()
    for value in small.state_dict().values():
        value.numpy()
    small.load_state_dict(model.state_dict())
    for (key, a), b in zip(msbp.memory_state_dict(small).items(),
                           msbp.memory_state_dict(model).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_whole_model_pickles_without_msbp_bookkeeping(backend, kind):
    """``torch.save(model)`` after training with LazyRowAdam: works (a weak reference to the
    optimizer used to make it fail), leaves out the gradient buffers the layers keep (each as
    large as its weight), and the loaded model trains on exactly like a copy of the original
    with a fresh optimizer."""
    from msbp.optim import LazyRowAdam

    cfg = SparseBackpropConfig(k=3, memory=0.5)
    if kind == "mlp":
        model = sparsify(_mlp(0), cfg, exclude="4")
        batches = _batches(6)
        loss = lambda m, x, y: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    else:
        torch.manual_seed(0)
        model = SparseLSTM(6, 4, config=cfg).double()
        batches = [(randn(3, 2, 6, gen=torch.Generator().manual_seed(i)), None) for i in range(6)]
        loss = lambda m, x, y: m(x)[0].pow(2).sum()  # noqa: E731

    opt = LazyRowAdam(model.parameters(), lr=0.01)
    for x, y in batches[:3]:
        opt.zero_grad()
        loss(model, x, y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for p in loaded.parameters():  # no weight-sized gradient buffer came along
        kept = [t for v in p.__dict__.values() for t in (v if isinstance(v, tuple) else (v,))]
        assert not any(isinstance(t, torch.Tensor) and t.numel() >= p.numel() > 16 for t in kept)
    twin = copy.deepcopy(model)
    for m in (loaded, twin):
        o = LazyRowAdam(m.parameters(), lr=0.01)
        for x, y in batches[3:]:
            o.zero_grad()
            loss(m, x, y).backward()
            o.step()
    for (name, p), q in zip(loaded.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("how", ["torch_save_model", "assign_loaded_state_dict"])
@pytest.mark.parametrize("kind", ["linear", "lstm"])
def test_loaded_slot_memory_grows_with_a_larger_batch(backend, kind, how):
    """A ``slot`` memory that came from ``torch.load`` (the whole model, or a state dict loaded
    with ``assign=True``) is resized in place at the next batch size: its storage must be one
    that can grow (a loaded tensor's cannot). The run then equals one never saved."""
    cfg = SparseBackpropConfig(k=2, memory=0.5, memory_layout="slot")
    torch.manual_seed(0)
    if kind == "linear":
        model = SparseLinear(4, 6, config=cfg, dtype=torch.float64)
        x2, x3 = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)

        def run(m, x):
            m(x).sin().sum().backward()
    else:
        model = SparseLSTM(4, 3, config=cfg).double()
        x2 = torch.randn(5, 2, 4, dtype=torch.float64)
        x3 = torch.randn(5, 3, 4, dtype=torch.float64)

        def run(m, x):
            m(x)[0].sin().sum().backward()

    run(model, x2)
    buf = io.BytesIO()
    if how == "torch_save_model":
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    else:
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        loaded = copy.deepcopy(model)
        loaded.load_state_dict(torch.load(buf), assign=True)
    twin = copy.deepcopy(model)
    for m in (loaded, twin):
        m.zero_grad(set_to_none=True)
        run(m, x3)  # 3 rows: the memory of 2 grows
    for (name, p), q in zip(loaded.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    for p, q in zip(loaded.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
