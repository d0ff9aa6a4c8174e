"""Varlen selection and packing: every backend against the reference and against an
independent unpad pipeline (nonzero + cumsum + gather, as flash_attn.bert_padding.unpad_input),
gradients, opcheck, torch.compile and the error paths."""
import pytest
import torch
from torch.nn import functional as F

from vsops import budget_to_k, reference
from vsops.ops import varlen as ops
from vsops.varlen import kept_counts, select_and_pack, select_and_pad, select_visual_tokens, unpack


def unpad_pipeline(keep, x):
    """The PyTorch route vsops replaces (flash_attn.bert_padding.unpad_input)."""
    seqlens = keep.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    return x.reshape(-1, *x.shape[2:])[indices], cu, int(seqlens.max()), indices


def _keep_patterns(b, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    ragged = torch.rand(b, length, generator=g) < 0.3
    ragged[1] = False  # an empty sample
    ragged[2, :] = False
    ragged[2, length - 1] = True  # one kept
    ragged[3] = True  # all kept
    return {
        "ragged": ragged,
        "all": torch.ones(b, length, dtype=torch.bool),
        "none": torch.zeros(b, length, dtype=torch.bool),
    }


def _batch(b, length, hidden, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, length, hidden, generator=g).to(device=device, dtype=dtype)
    positions = torch.randint(0, 100, (3, b, length), generator=g).to(device)
    labels = torch.randint(-100, 1000, (b, length), generator=g).to(device)
    return embeds, positions, labels


# --- pack / unpack ------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["ragged", "all", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_counts", [False, True])
def test_pack_matches_unpad_pipeline(backend, pattern, dtype, with_counts):
    name, device = backend
    b, length, hidden = 5, 23, 37
    keep = _keep_patterns(b, length)[pattern].to(device)
    embeds, positions, labels = _batch(b, length, hidden, device, dtype)
    counts = keep.sum(1).tolist() if with_counts else None
    packed = select_and_pack(keep, embeds, positions, labels, counts=counts)

    expected, cu, max_seqlen, indices = unpad_pipeline(keep, embeds)
    out_embeds, out_positions, out_labels = packed.tensors
    assert out_embeds.dtype == dtype and torch.equal(out_embeds, expected)
    assert torch.equal(out_positions, positions.reshape(3, -1)[:, indices])
    assert torch.equal(out_labels, labels.reshape(-1)[indices])
    assert packed.cu_seqlens.dtype == torch.int32 and torch.equal(packed.cu_seqlens.cpu(), cu.cpu())
    assert isinstance(packed.max_seqlen, int) and packed.max_seqlen == max_seqlen
    assert packed.indices.dtype == torch.int64 and torch.equal(packed.indices, indices)


def test_pack_gradient_is_a_scatter(backend):
    _, device = backend
    keep = _keep_patterns(5, 23)["ragged"].to(device)
    embeds = _batch(5, 23, 8, device)[0].requires_grad_(True)
    packed = select_and_pack(keep, embeds)
    grad = torch.randn_like(packed.tensors[0])
    packed.tensors[0].backward(grad)
    expected = torch.zeros_like(embeds).reshape(-1, 8)
    expected[packed.indices] = grad
    assert torch.equal(embeds.grad, expected.view_as(embeds))


def test_unpack_inverts_pack(backend):
    _, device = backend
    keep = _keep_patterns(5, 23)["ragged"].to(device)
    embeds = _batch(5, 23, 8, device)[0]
    packed = select_and_pack(keep, embeds)
    for fill in (0, -1.5):
        restored = packed.unpack(packed.tensors[0], fill=fill)
        torch.testing.assert_close(restored[keep], embeds[keep], rtol=0, atol=0)
        assert (restored[~keep] == fill).all()
    source = packed.tensors[0].detach().requires_grad_(True)
    unpack(source, packed.indices, 5, 23).sum().backward()
    assert torch.equal(source.grad, torch.ones_like(source))


def test_pack_kernels_match_reference(backend):
    name, device = backend
    keep = _keep_patterns(4, 50, seed=3)["ragged"].to(device)
    n, total = keep.numel(), int(keep.sum())
    rows = [
        torch.randn(n, 37, device=device),
        torch.randint(0, 9, (n, 3), device=device),
        torch.rand(n, 1, device=device) < 0.5,
        torch.randn(n, 16, device=device).to(torch.bfloat16),
    ]
    indices, packed = ops.pack.op(name)(keep, total, rows)
    ref_indices, ref_packed = reference.varlen_pack(keep, total, rows)
    assert torch.equal(indices, ref_indices)
    for a, e in zip(packed, ref_packed):
        assert a.dtype == e.dtype and torch.equal(a, e)
    for p in ref_packed:
        for fill in (0, -100, 1.5):
            if p.dtype == torch.bool and fill not in (0, 1):
                continue
            out = ops.unpack.op(name)(p, indices, n, fill)
            assert torch.equal(out, reference.varlen_unpack(p, indices, n, fill))


def test_pack_and_unpack_of_outputs_past_the_cache():
    """Outputs of 16 MiB and more are written with streaming stores (csrc/cpu/stream_copy.h):
    rows of 2,062 bytes start at every alignment, so the aligned body and the copied head and
    tail of each row are all exercised."""
    g = torch.Generator().manual_seed(5)
    n = 40_000
    keep = torch.rand(n, generator=g) < 0.35
    total = int(keep.sum())
    rows = [torch.randn(n, 1031, generator=g).half(), torch.randint(0, 1 << 40, (n, 3), generator=g)]
    assert total * rows[0].shape[1] * 2 >= 16 << 20
    for name in ops.pack.backends():
        if name not in ("cpu", "reference"):
            continue
        indices, packed = ops.pack.op(name)(keep, total, rows)
        assert torch.equal(indices, keep.nonzero().flatten())
        for p, r in zip(packed, rows):
            assert torch.equal(p, r[keep])
        restored = ops.unpack.op(name)(packed[0], indices, n, -2.0)
        assert torch.equal(restored[keep], rows[0][keep]) and (restored[~keep] == -2.0).all()


def test_pack_ops_opcheck():
    keep = _keep_patterns(4, 9)["ragged"]
    rows = [torch.randn(36, 5, requires_grad=True), torch.randn(36, 2)]
    for name in ops.pack.backends():
        if name == "triton":
            continue  # the interpreter is too slow for opcheck's repeats; tested above
        total = int(keep.sum())
        # opcheck's aot_dispatch check adds every output into one sum, which cannot mix the
        # int64 indices with float rows; test_pack_torch_compile_fullgraph covers that path.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(ops.pack.op(name), (keep, total, rows), test_utils=utils)
        indices, packed = ops.pack.op(name)(keep, total, [r.detach() for r in rows])
        torch.library.opcheck(ops.unpack.op(name), (packed[0].requires_grad_(True), indices, 36, 0.0))


def test_pack_torch_compile_fullgraph():
    torch._dynamo.reset()
    keep = _keep_patterns(5, 23)["ragged"]
    counts = keep.sum(1).tolist()
    embeds = torch.randn(5, 23, 8)

    def step(x):
        packed = select_and_pack(keep, x, counts=counts)
        return (packed.tensors[0] * 2).sum(1), packed.cu_seqlens

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = embeds.clone().requires_grad_(True)
    out, cu = compiled(x)
    out.sum().backward()
    x_eager = embeds.clone().requires_grad_(True)
    expected, expected_cu = step(x_eager)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    assert torch.equal(cu, expected_cu)
    torch.testing.assert_close(x.grad, x_eager.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only observable on a GPU")
def test_pack_with_host_counts_does_not_sync():
    keep = _keep_patterns(5, 23)["ragged"].cuda()
    counts = keep.sum(1).tolist()
    embeds, positions, labels = _batch(5, 23, 64, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        select_and_pack(keep, embeds, positions, labels, counts=counts)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- pad ------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_select_and_pad(backend, side):
    _, device = backend
    keep = _keep_patterns(5, 23)["ragged"].to(device)
    embeds, positions, labels = _batch(5, 23, 6, device)
    padded = select_and_pad(keep, embeds, positions, labels, padding_side=side, pad_values=[0.0, 1, -100])
    counts = keep.sum(1).tolist()
    width = max(counts)
    assert padded.lengths == counts
    out_embeds, out_positions, out_labels = padded.tensors
    assert out_embeds.shape == (5, width, 6) and out_positions.shape == (3, 5, width)
    for b, n in enumerate(counts):
        slots = slice(width - n, width) if side == "left" else slice(0, n)
        pads = slice(0, width - n) if side == "left" else slice(n, width)
        assert torch.equal(out_embeds[b, slots], embeds[b][keep[b]])
        assert torch.equal(out_positions[:, b, slots], positions[:, b][:, keep[b]])
        assert torch.equal(out_labels[b, slots], labels[b][keep[b]])
        assert (out_embeds[b, pads] == 0).all() and (out_positions[:, b, pads] == 1).all()
        assert (out_labels[b, pads] == -100).all()
        assert padded.attention_mask[b, slots].eq(1).all() and padded.attention_mask[b, pads].eq(0).all()


# --- selection ------------------------------------------------------------------------------


def _brute_force_selection(scores, visual, budget, groups):
    """Per group: sort (score descending, NaN as -inf, index ascending), keep the first k."""
    keep = ~visual.clone()
    for b in range(scores.shape[0]):
        for g in sorted(set(groups[b][visual[b]].tolist())):
            members = [i for i in range(scores.shape[1]) if visual[b, i] and groups[b, i] == g]
            key = lambda i: (-(float("-inf") if scores[b, i].isnan() else scores[b, i].item()), i)  # noqa: E731
            for i in sorted(members, key=key)[: budget_to_k(len(members), budget)]:
                keep[b, i] = True
    return keep


def _selection_inputs(device):
    g = torch.Generator().manual_seed(5)
    b, length = 4, 40
    scores = torch.randint(0, 6, (b, length), generator=g).float()  # many ties
    scores[0, 7] = float("nan")
    scores[0, 9] = float("-inf")
    visual = torch.zeros(b, length, dtype=torch.bool)
    visual[0, 3:30] = True
    visual[1, 10:12] = True
    visual[3, :] = True  # sample 2 is text only
    image = torch.full((b, length), -1)
    image[0, 3:20], image[0, 20:30] = 0, 1
    image[1, 10:12] = 0
    image[3, :13], image[3, 13:14], image[3, 14:] = 0, 1, 2
    return scores.to(device), visual.to(device), image.to(device)


@pytest.mark.parametrize("budget", [0.1, 0.25, 1.0])
def test_select_visual_tokens_per_sample(backend, budget):
    _, device = backend
    scores, visual, _ = _selection_inputs(device)
    keep = select_visual_tokens(scores, visual, budget)
    expected = _brute_force_selection(scores.cpu(), visual.cpu(), budget, torch.zeros_like(visual.cpu(), dtype=torch.long))
    assert torch.equal(keep.cpu(), expected)
    assert keep[2].all(), "a text-only sample passes through unchanged"
    assert kept_counts(visual.sum(1).tolist(), (~visual).sum(1).tolist(), budget) == keep.sum(1).tolist()


@pytest.mark.parametrize("budget", [0.1, 0.5])
def test_select_visual_tokens_per_image(budget):
    scores, visual, image = _selection_inputs("cpu")
    keep = select_visual_tokens(scores, visual, budget, scope="image", image_index=image)
    assert torch.equal(keep, _brute_force_selection(scores, visual, budget, image))
    # sample 3 has 3 images: 13, 1 and 26 visual tokens, each keeps at least one
    assert keep[3, 13] and keep[3, :13].sum() == budget_to_k(13, budget)


def test_selection_then_pack_bfloat16_scores(backend):
    _, device = backend
    scores, visual, _ = _selection_inputs(device)
    keep = select_visual_tokens(scores.to(torch.bfloat16), visual, 0.25)
    assert torch.equal(keep, select_visual_tokens(scores, visual, 0.25))


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda s, v, i: select_visual_tokens(s, v, 0.0), ValueError, "budget"),
        (lambda s, v, i: select_visual_tokens(s, v, 1.5), ValueError, "budget"),
        (lambda s, v, i: select_visual_tokens(s, v.long(), 0.2), TypeError, "visual_mask must be a bool"),
        (lambda s, v, i: select_visual_tokens(s, v[:, 1:], 0.2), ValueError, "visual_mask must have shape"),
        (lambda s, v, i: select_visual_tokens(s.long(), v, 0.2), TypeError, "scores"),
        (lambda s, v, i: select_visual_tokens(s, v, 0.2, scope="batch"), ValueError, "scope"),
        (lambda s, v, i: select_visual_tokens(s, v, 0.2, scope="image"), TypeError, "image_index"),
        (lambda s, v, i: select_visual_tokens(s, v, 0.2, scope="image", image_index=i.clamp(min=0)), ValueError, "exactly at the visual"),
        (lambda s, v, i: select_visual_tokens(s, v, 0.2, image_index=i), ValueError, "only used"),
        (lambda s, v, i: select_and_pack(v.long(), s), TypeError, "keep must be a bool"),
        (lambda s, v, i: select_and_pack(v, s[:, 1:]), ValueError, r"tensors\[0\] has shape"),
        (lambda s, v, i: select_and_pack(v, s, torch.zeros(3, 40)), ValueError, r"tensors\[1\] has shape"),
        (lambda s, v, i: select_and_pack(v, s, counts=[1, 2]), ValueError, "one entry per sample"),
        (lambda s, v, i: select_and_pack(v, s, counts=[1, 2, 3, 4]), ValueError, "counts must be the True per row"),
        (lambda s, v, i: select_and_pad(v, s, counts=v.sum(1).flip(0).tolist()), ValueError, "True per row"),
        (lambda s, v, i: select_and_pad(v, s, padding_side="top"), ValueError, "padding_side"),
        (lambda s, v, i: select_and_pad(v, s, pad_values=[0, 1]), ValueError, "pad_values"),
        (lambda s, v, i: unpack(s.reshape(-1), torch.arange(3), 1, 3), ValueError, "total"),
    ],
)
def test_bad_input_raises(make, error, match):
    """(The wrong split above has the right total: only a per-row check catches it.)"""
    scores, visual, image = _selection_inputs("cpu")
    with pytest.raises(error, match=match):
        make(scores, visual, image)


def test_benchmark_baselines_pack_what_vsops_packs():
    """The PyTorch routes that `vsops bench --op varlen` times must compute the same packing,
    or their timings compare different work."""
    from vsops.benchmarks import varlen as bench_varlen

    g = torch.Generator().manual_seed(11)
    b, length = 3, 64
    visual = torch.zeros(b, length, dtype=torch.bool)
    visual[0, 5:50] = True
    visual[2, 0:64] = True  # sample 1 is text only
    inputs = (
        torch.randn(b, length, generator=g),
        visual,
        torch.randn(b, length, 16, generator=g).bfloat16(),
        torch.randint(0, 99, (3, b, length), generator=g),
    )
    ours = bench_varlen.vsops_fn(*inputs)()
    for route in bench_varlen.ROUTES.values():
        embeds, positions, cu_seqlens, max_seqlen = route(*inputs)()
        assert torch.equal(embeds, ours.tensors[0]) and torch.equal(positions, ours.tensors[1])
        assert torch.equal(cu_seqlens, ours.cu_seqlens) and max_seqlen == ours.max_seqlen


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=["B=0", "L=0", "empty"])
def test_empty_batches_pack_pad_and_unpack(backend, shape):
    _, device = backend
    keep = torch.zeros(shape, dtype=torch.bool, device=device)
    embeds = torch.randn(*shape, 4, device=device)
    positions = torch.zeros(3, *shape, dtype=torch.long, device=device)
    packed = select_and_pack(keep, embeds, positions)
    assert [tuple(t.shape) for t in packed.tensors] == [(0, 4), (3, 0)]
    assert packed.cu_seqlens.tolist() == [0] * (shape[0] + 1) and packed.max_seqlen == 0
    assert packed.unpack(packed.tensors[0]).shape == (*shape, 4)
    padded = select_and_pad(keep, embeds, positions)
    assert [tuple(t.shape) for t in padded.tensors] == [(shape[0], 0, 4), (3, shape[0], 0)]


def test_unpack_after_a_mask_that_drops_everything(backend):
    _, device = backend
    keep = torch.zeros(2, 6, dtype=torch.bool, device=device)
    packed = select_and_pack(keep, torch.randn(2, 6, 3, device=device))
    out = packed.unpack(packed.tensors[0], fill=7.0)
    assert out.shape == (2, 6, 3) and bool((out == 7).all())


def test_zero_width_rows_pack_pad_and_unpack(backend):
    """A tensor of zero-width rows (data pointer null), alone and beside another: the kernels
    copy nothing for it (.ci/sanitize.sh catches a memcpy given the null pointer)."""
    _, device = backend
    keep = torch.tensor([[True, False, True], [False, True, True]], device=device)
    empty = torch.zeros(2, 3, 0, device=device)
    embeds = torch.randn(2, 3, 4, device=device)
    for tensors in [(empty,), (empty, embeds)]:
        packed = select_and_pack(keep, *tensors)
        assert packed.tensors[0].shape == (4, 0)
        assert packed.unpack(packed.tensors[0]).shape == (2, 3, 0)
    packed = select_and_pack(keep, empty, embeds)
    assert torch.equal(packed.tensors[1], embeds[keep])
    padded = select_and_pad(keep, empty, embeds)
    assert padded.tensors[0].shape == (2, 2, 0) and torch.equal(padded.tensors[1][padded.attention_mask.bool()], embeds[keep])


@pytest.mark.parametrize("name", ops.unpack.backends())
def test_sizes_no_machine_can_hold_are_refused(name):
    """rows and total past 2^48 bytes of output: a ValueError naming them from every backend,
    not an allocation failing inside the kernel. Zero-width rows ask for nothing."""
    packed, indices = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    for rows in (1 << 62, 1 << 46):
        with pytest.raises(ValueError, match=f"rows = {rows} .*2\\^48 bytes"):
            ops.unpack.op(name)(packed, indices, rows, 0)
    assert ops.unpack.op(name)(torch.zeros(1, 0), torch.tensor([5]), 1 << 62, 0).shape == (1 << 62, 0)
    with pytest.raises(ValueError, match=f"total = {1 << 62}"):
        ops.pack.op(name)(torch.zeros(4, dtype=torch.bool), 1 << 62, [torch.zeros(4, 4)])


def test_public_unpack_refuses_a_batch_no_machine_can_hold():
    with pytest.raises(ValueError, match=f"rows = {1 << 62}"):
        unpack(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 1 << 31, 1 << 31)
    # batch * length past int64: refused before the op's size argument could overflow.
    with pytest.raises(ValueError, match=f"batch \\* length: rows = {1 << 64}"):
        unpack(torch.randn(2, 3), torch.tensor([0, 1]), 1 << 62, 4)
