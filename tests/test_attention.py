"""SparseMultiheadAttention: exact against nn.MultiheadAttention at k = E, against the reference
(sparse_linear_ref projections) below it, and its round trips through sparsify / densify."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import logged_rows, track_rows, written_rows
from torch import nn

import msbp
from msbp import SparseBackpropConfig, SparseLinear, SparseMultiheadAttention
from msbp.ops.reference import sparse_linear_ref

F64 = {"rtol": 1e-9, "atol": 1e-11}
E, HEADS, L, S, N = 8, 2, 4, 5, 3


def make_pair(config, seed=0, **kw):
    torch.manual_seed(seed)
    dense = nn.MultiheadAttention(E, HEADS, dtype=torch.float64, **kw)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_()
    twin = nn.MultiheadAttention(E, HEADS, dtype=torch.float64, **kw)
    twin.load_state_dict(dense.state_dict())
    return twin, SparseMultiheadAttention.from_dense(dense, config)


def inputs(batch_first, kdim=E, vdim=E, batched=True, seed=1):
    gen = torch.Generator().manual_seed(seed)

    def rnd(length, dim):
        shape = ((N, length, dim) if batch_first else (length, N, dim)) if batched else (
            length, dim)
        return torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)

    return rnd(L, E), rnd(S, kdim), rnd(S, vdim)


def run(mha, q, k, v, g, **kw):
    mha.zero_grad(set_to_none=True)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, weights = mha(q, k, v, **kw)
    out.backward(g)
    grads = {n: p.grad.clone() for n, p in mha.named_parameters()}
    return out.detach(), weights, q.grad, k.grad, v.grad, grads


CASES = {
    "plain": ({}, {}),
    "batch_first-kpm": (dict(batch_first=True), dict(key_padding_mask="bool")),
    "attn_mask-bool": ({}, dict(attn_mask="bool2d")),
    "attn_mask-float3d-kpm-noweights": (
        dict(batch_first=True), dict(attn_mask="float3d", key_padding_mask="bool",
                                     need_weights=False)),
    "kdim-vdim-per-head-weights": (dict(kdim=6, vdim=3), dict(average_attn_weights=False)),
    "bias_kv-zero_attn-kpm": (dict(add_bias_kv=True, add_zero_attn=True),
                              dict(key_padding_mask="bool", attn_mask="bool2d")),
    "no-bias": (dict(bias=False), {}),
    "unbatched": (dict(batch_first=True), dict(unbatched=True)),
}


def masks(call):
    gen = torch.Generator().manual_seed(7)
    call = dict(call)
    if call.get("key_padding_mask") == "bool":
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, -1] = True
        call["key_padding_mask"] = kpm
    if call.get("attn_mask") == "bool2d":
        call["attn_mask"] = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=2)
    elif call.get("attn_mask") == "float3d":
        call["attn_mask"] = torch.randn(N * HEADS, L, S, generator=gen, dtype=torch.float64)
    return call


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_k_equals_embed_dim_is_nn_multihead_attention(case):
    build, call = CASES[case]
    call = masks(call)
    batched = not call.pop("unbatched", False)
    dense, sparse = make_pair(SparseBackpropConfig(k=E, memory=0.8), **build)
    q, k, v = inputs(dense.batch_first, build.get("kdim", E), build.get("vdim", E), batched)
    with torch.no_grad():
        g = torch.randn_like(dense(q, k, v, **call)[0])
    want = run(dense, q, k, v, g, **call)
    got = run(sparse, q, k, v, g, **call)
    for a, b in zip(got[:5], want[:5], strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, **F64)
    assert got[5].keys() == want[5].keys()
    for name in want[5]:
        torch.testing.assert_close(got[5][name], want[5][name], **F64, msg=name)
    for _, memory in sparse.named_memories():
        assert not memory.any()


def reference_attention(x, mha, boxes, options, key_padding_mask):
    """Self-attention (L, N, E) with every projection through ``sparse_linear_ref``."""
    e, h = E, HEADS
    w, b = mha.in_proj_weight, mha.in_proj_bias
    proj = [
        sparse_linear_ref(x, w[i * e:(i + 1) * e], b[i * e:(i + 1) * e], boxes[i], **options)
        for i in range(3)
    ]
    length, n, _ = x.shape
    q, k, v = (t.reshape(length, n * h, e // h).transpose(0, 1) for t in proj)
    scores = torch.bmm(q / math.sqrt(e // h), k.transpose(1, 2))
    pad = torch.zeros(n, length, dtype=x.dtype).masked_fill(key_padding_mask, float("-inf"))
    scores = scores + pad.repeat_interleave(h, 0).unsqueeze(1)
    out = torch.bmm(torch.softmax(scores, -1), v).transpose(0, 1).reshape(length, n, e)
    return sparse_linear_ref(out, mha.out_proj.weight, mha.out_proj.bias, boxes[3], **options)


@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_sparse_projections_match_reference(layout):
    config = SparseBackpropConfig(k=3, memory=0.8, memory_layout=layout)
    _, sparse = make_pair(config)
    mha_ref = nn.MultiheadAttention(E, HEADS, dtype=torch.float64)
    mha_ref.load_state_dict({k: v for k, v in sparse.state_dict().items() if "memory" not in k})
    empty = torch.zeros(E, dtype=torch.float64) if layout == "unit" else torch.zeros(
        0, E, dtype=torch.float64)
    boxes = [[empty.clone()] for _ in range(4)]
    options = dict(k=3, selection="unified", alpha=0.8, layout=layout)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, -1] = True
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(L, N, E, generator=gen, dtype=torch.float64)
        g = torch.randn(L, N, E, generator=gen, dtype=torch.float64)
        *_, dq, dk, dv, grads = run(sparse, x, x, x, g, key_padding_mask=kpm, need_weights=False)
        dx = dq + dk + dv  # self-attention: x feeds all three projections
        mha_ref.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        reference_attention(xr, mha_ref, boxes, options, kpm).backward(g)
        torch.testing.assert_close(dx, xr.grad, **F64)
        for name, p in mha_ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, **F64, msg=name)
        for (_, memory), box in zip(sparse.named_memories(), boxes[:3], strict=True):
            torch.testing.assert_close(memory, box[0], **F64)
        torch.testing.assert_close(sparse.out_proj.memory, boxes[3][0], **F64)
    # every projection kept its own k units: q, k and v rows of in_proj_weight, out_proj rows
    rows = grads["in_proj_weight"].abs().sum(1).view(3, E) > 0
    assert rows.sum(1).tolist() == [3, 3, 3]
    assert int((grads["out_proj.weight"].abs().sum(1) > 0).sum()) == 3


def test_sparsify_densify_state_dict_and_transformer_layer():
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0,
                                       batch_first=True)
    model = msbp.sparsify(layer, SparseBackpropConfig(k=2))
    assert isinstance(model.self_attn, SparseMultiheadAttention)
    assert isinstance(model.self_attn.out_proj, SparseLinear)
    assert model.self_attn.out_proj.name == "self_attn.out_proj"
    assert isinstance(model.linear1, SparseLinear)
    x = torch.randn(2, 5, E)
    model(x, src_key_padding_mask=torch.tensor([[False] * 4 + [True]] * 2)).sum().backward()
    state = model.state_dict()
    assert {"self_attn.memory_q", "self_attn.out_proj.memory"} <= set(state)
    with msbp.dense_backward(model):
        (dw,) = torch.autograd.grad(model(x).sum(), [model.self_attn.in_proj_weight])
    assert int((dw.abs().sum(1) > 0).sum()) > 6  # dense there
    model.eval()
    with torch.no_grad():
        y_sparse = model(x)
    dense = msbp.densify(model)
    assert type(dense.self_attn) is nn.MultiheadAttention
    assert type(dense.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert dense.self_attn.in_proj_weight is model.self_attn.in_proj_weight
    with torch.no_grad():
        torch.testing.assert_close(dense(x), y_sparse)
    again = msbp.sparsify(dense, SparseBackpropConfig(k=2))
    again.load_state_dict(state)
    torch.testing.assert_close(again.self_attn.memory_q, state["self_attn.memory_q"])


def test_in_proj_rows_go_into_the_parameters_grad(backend):
    """The q, k and v projections are row blocks of in_proj_weight: their kept rows go into
    that Parameter's .grad (the native path adds them in place) and into its row log, shifted
    to their block. Over steps with .grad set to None, kept, and added to by a dense penalty,
    the gradients equal the reference's, the logged rows are those where the projections
    wrote, and the native path reuses one buffer (each call's node holds it weakly: held
    strongly, the later calls of a forward had seen it held and each made a new one)."""
    from msbp.ops.touched_rows import take_touched_rows

    config = SparseBackpropConfig(k=3, memory=0.8)
    _, sparse = make_pair(config)
    mha_ref = nn.MultiheadAttention(E, HEADS, dtype=torch.float64)
    mha_ref.load_state_dict({k: v for k, v in sparse.state_dict().items() if "memory" not in k})
    boxes = [[torch.zeros(E, dtype=torch.float64)] for _ in range(4)]
    options = dict(k=3, selection="unified", alpha=0.8, layout="unit")
    w = sparse.in_proj_weight
    track_rows(w)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    gen = torch.Generator().manual_seed(4)
    pointers = []
    for step, (none, penalty) in enumerate([(True, 0), (False, 0), (True, 0), (False, 1),
                                            (True, 0), (True, 0)]):
        x = torch.randn(L, N, E, generator=gen, dtype=torch.float64)
        g = torch.randn(L, N, E, generator=gen, dtype=torch.float64)
        for m in (sparse, mha_ref):
            m.zero_grad(set_to_none=none)
        if none:
            take_touched_rows(w)
        loss = (sparse(x, x, x, key_padding_mask=kpm, need_weights=False)[0] * g).sum()
        ref = (reference_attention(x, mha_ref, boxes, options, kpm) * g).sum()
        if penalty:  # (a term of weight 0 would still add a dense gradient)
            loss, ref = loss + w.square().sum(), ref + mha_ref.in_proj_weight.square().sum()
        loss.backward()
        ref.backward()
        for name, p in mha_ref.named_parameters():
            got = dict(sparse.named_parameters())[name].grad
            torch.testing.assert_close(got, p.grad, **F64, msg=f"step {step}: {name}")
        del got  # (a .grad held elsewhere is not reused)
        if none:
            assert logged_rows(w) == written_rows(w), step
            assert len(logged_rows(w)) == 9  # k rows in each of the three blocks
        pointers.append(w.grad.data_ptr())
    if backend == "native":  # one buffer throughout, put back by the first of the three calls
        assert len(set(pointers)) == 1


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", ["key_value_lengths", "batch_sizes", "attn_mask_2d",
                                  "attn_mask_3d", "ranks"])
def test_mismatched_shapes_are_value_errors_naming_them(backend, case, batch_first):
    """Shapes nn.MultiheadAttention refuses with its own checks: the sparse layer ran its
    projections and failed deep inside ("shape '[4, 4, 4]' is invalid for input of size 96",
    "The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension
    2", or bmm's batch2 message). Now a ValueError naming the arguments and their shapes, before
    anything runs. Found by the malformed-input fuzz."""
    torch.manual_seed(0)
    mha = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(8, 2, batch_first=batch_first),
                                              SparseBackpropConfig(k=3))

    def batched(*shape):  # (L, N, E) given; (N, L, E) under batch_first
        t = torch.randn(*shape)
        return t.transpose(0, 1).contiguous() if batch_first else t

    q, kv = batched(4, 2, 8), batched(5, 2, 8)
    args = {
        "key_value_lengths": (q, kv, batched(6, 2, 8), None, "key of shape"),
        "batch_sizes": (q, batched(5, 3, 8), batched(5, 3, 8), None, "batch sizes"),
        "attn_mask_2d": (q, kv, kv, torch.zeros(3, 3), "attn_mask of shape"),
        "attn_mask_3d": (q, kv, kv, torch.zeros(3, 4, 5), "attn_mask of shape"),
        "ranks": (torch.randn(4, 8), kv, kv, None, "all be 3-D"),
    }[case]
    query, key, value, mask, words = args
    with pytest.raises(ValueError, match=words):
        mha(query.requires_grad_(), key, value, attn_mask=mask)


@pytest.mark.parametrize("mask_shape", [(4, 5), (2 * 2, 4, 5)])
def test_valid_attn_masks_still_pass_the_shape_checks(backend, mask_shape):
    """The shape checks above take the masks nn.MultiheadAttention takes: (L, S) and
    (N heads, L, S) batched, (heads, L, S) unbatched; the results are nn's."""
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(8, 2)
    mha = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(8, 2),
                                              SparseBackpropConfig(k=8))
    mha.load_state_dict(dense.state_dict(), strict=False)
    mask = torch.randn(*mask_shape)
    for q, kv, m in ((torch.randn(4, 2, 8), torch.randn(5, 2, 8), mask),
                     (torch.randn(4, 8), torch.randn(5, 8), mask[:2] if mask.dim() == 3 else mask)):
        got = mha(q.requires_grad_(), kv, kv, attn_mask=m)[0]
        want = dense(q, kv, kv, attn_mask=m)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
