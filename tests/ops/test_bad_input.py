"""Every public function through a matrix of bad inputs: wrong dtypes, ranks, devices (meta),
Python lists, empties, strides, out-of-range values, NaN and inf.

Each case ends in a clear error (its exact class, and the argument's name in the message) or in
a result: the unchanged call's for a non-contiguous copy of an argument, the reference
backend's for the others. Every case runs with the reference backend forced and with the
compiled CPU one, so a Python check and a kernel check of the same input must agree.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import pytest
import torch

import vsops
from vsops import backends, methods
from vsops.varlen import select_and_pack, select_and_pad, select_visual_tokens, unpack

BACKENDS = ["reference", "cpu"] if backends.available()["cpu"] else ["reference"]


def _rand(*shape, seed=0, **kwargs):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **kwargs)


def _uniform(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _cu(*bounds):
    return torch.tensor(bounds, dtype=torch.int32)


# --- each public function and one valid call of it -------------------------------------------

def _pack(keep, embeds, positions, counts=None):
    return select_and_pack(keep, embeds, positions, counts=counts)


def _pad(keep, embeds, labels, pad_values=(0, -100), padding_side="left"):
    return select_and_pad(keep, embeds, labels, pad_values=pad_values, padding_side=padding_side)


def _module(scores, cu_seqlens=None):
    return vsops.DiffTopK(0.5)(scores, cu_seqlens)


def _keep():
    return torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)


def _weights():
    return dict(q_weight=_rand(4, 6, seed=1), q_bias=_rand(4, seed=2), k_weight=_rand(4, 6, seed=3),
                k_bias=_rand(4, seed=4))


FUNCTIONS: dict[str, tuple[Callable, Callable[[], dict]]] = {
    "difftopk": (vsops.difftopk, lambda: dict(scores=_rand(3, 8), k=3)),
    "difftopk_packed": (vsops.difftopk, lambda: dict(scores=_rand(10), k=torch.tensor([1, 3]), cu_seqlens=_cu(0, 4, 10))),
    "topk_mask": (vsops.topk_mask, lambda: dict(scores=_rand(3, 8), k=3)),
    "topk_mask_packed": (vsops.topk_mask, lambda: dict(scores=_rand(10), k=torch.tensor([1, 3]), cu_seqlens=_cu(0, 4, 10))),
    "DiffTopK": (_module, lambda: dict(scores=_rand(3, 8))),
    "constraint_loss": (vsops.constraint_loss, lambda: dict(soft=_uniform(3, 8) * 0.98 + 0.01,
                                                            hard=_uniform(3, 8, seed=1) > 0.5)),
    "lis_score": (vsops.lis_score, lambda: dict(x=_rand(2, 5, 6), **_weights())),
    "lis_score_packed": (vsops.lis_score, lambda: dict(x=_rand(7, 6), **_weights(), cu_seqlens=_cu(0, 3, 7))),
    "select_visual_tokens": (select_visual_tokens, lambda: dict(scores=_rand(2, 6), visual_mask=_keep(), budget=0.5)),
    "select_and_pack": (_pack, lambda: dict(keep=_keep(), embeds=_rand(2, 6, 3), positions=torch.arange(36).view(3, 2, 6))),
    "select_and_pad": (_pad, lambda: dict(keep=_keep(), embeds=_rand(2, 6, 3), labels=torch.arange(12).view(2, 6))),
    "unpack": (unpack, lambda: dict(packed=_rand(5, 3), indices=torch.tensor([0, 2, 3, 7, 11]), batch=2, length=6, fill=0.0)),
    "attention_received": (vsops.attention_received, lambda: dict(q=_rand(5, 2, 4), k=_rand(7, 2, 4, seed=1),
                                                                  cu_seqlens_q=_cu(0, 2, 5), cu_seqlens_k=_cu(0, 3, 7))),
    "divprune": (methods.divprune, lambda: dict(x=_rand(8, 4), k=2, cu_seqlens=_cu(0, 3, 8))),
    "norm": (methods.norm, lambda: dict(x=_rand(8, 4), k=2, cu_seqlens=_cu(0, 3, 8))),
    "mean_attention": (methods.mean_attention, lambda: dict(x=_rand(8, 4), k=2, cu_seqlens=_cu(0, 3, 8))),
    "random": (methods.random, lambda: dict(x=_rand(8, 4), k=2, cu_seqlens=_cu(0, 3, 8))),
    "visionzip": (methods.visionzip, lambda: dict(x=_rand(8, 4), k=3, received=_uniform(8), keys=_rand(8, 5))),
    "budget_to_k": (vsops.budget_to_k, lambda: dict(n=torch.tensor([0, 3, 10]), budget=0.3)),
}

# How the messages name an argument where it is not its keyword here.
MESSAGE_NAMES = {("select_and_pack", "embeds"): r"tensors\[0\]", ("select_and_pack", "positions"): r"tensors\[1\]",
                 ("select_and_pad", "embeds"): r"tensors\[0\]", ("select_and_pad", "labels"): r"tensors\[1\]"}


# --- what a case expects -------------------------------------------------------------------------

class Raises(NamedTuple):
    error: type
    names: str  # a regex the message must contain: the argument's name


SAME = "the result of the unchanged call"
REFERENCE = "the reference backend's result"


class Case(NamedTuple):
    function: str
    what: str
    mutate: Callable[[dict], dict]
    expected: Raises | str


def change(arg: str, fn: Callable) -> Callable[[dict], dict]:
    """A mutation that replaces argument ``arg`` by ``fn(its value)``."""
    return lambda kw: {**kw, arg: fn(kw[arg])}


def put(**values) -> Callable[[dict], dict]:
    return lambda kw: {**kw, **values}


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, not contiguous."""
    out = torch.stack([t, t], -1)[..., 0]
    assert t.numel() < 2 or not out.is_contiguous()
    return out


def with_value(index, value) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t):
        t = t.clone()
        t.view(-1)[index] = value
        return t
    return fn


# --- the matrix -----------------------------------------------------------------------------------

def _generic_cases() -> list[Case]:
    """Every tensor argument of every function: on meta (refused by name), as a Python list
    (refused by name) and non-contiguous (the same result)."""
    cases = []
    for function, (_, make) in FUNCTIONS.items():
        for arg, value in make().items():
            if not isinstance(value, torch.Tensor):
                continue
            name = MESSAGE_NAMES.get((function, arg), arg)
            cases += [
                Case(function, f"{arg} on meta", change(arg, lambda t: t.to("meta")), Raises(ValueError, f"{name} is on meta")),
                Case(function, f"{arg} a list", change(arg, lambda t: t.tolist()), Raises(TypeError, name)),
                Case(function, f"{arg} not contiguous", change(arg, strided), SAME),
            ]
    return cases


INF, NAN = float("inf"), float("nan")
f8 = torch.float8_e4m3fn

SPECIFIC = [
    # difftopk / topk_mask: dtypes, ranks, empties, k and cu_seqlens out of range, NaN and inf
    Case("difftopk", "int scores", change("scores", lambda t: t.long()), Raises(TypeError, "scores")),
    Case("difftopk", "float8 scores", change("scores", lambda t: t.to(f8)), Raises(TypeError, "scores")),
    Case("topk_mask", "complex scores", change("scores", lambda t: t.to(torch.complex64)), Raises(TypeError, "scores")),
    Case("difftopk", "float16 scores", change("scores", lambda t: t.half()), REFERENCE),
    Case("difftopk", "float64 scores", change("scores", lambda t: t.double()), REFERENCE),
    Case("difftopk", "float k", put(k=2.5), Raises(TypeError, "k")),
    Case("difftopk", "bool k", put(k=True), Raises(TypeError, "k")),
    Case("difftopk_packed", "float k tensor", change("k", lambda t: t.float()), Raises(TypeError, "k")),
    Case("difftopk_packed", "int64 cu_seqlens", change("cu_seqlens", lambda t: t.long()), Raises(TypeError, "cu_seqlens")),
    Case("difftopk", "3-D scores", change("scores", lambda t: t.unsqueeze(0)), Raises(ValueError, "scores")),
    Case("difftopk", "1-D scores without cu_seqlens", change("scores", lambda t: t[0]), Raises(ValueError, "scores")),
    Case("difftopk_packed", "2-D scores with cu_seqlens", change("scores", lambda t: t.view(2, 5)), Raises(ValueError, "scores")),
    Case("difftopk_packed", "2-D cu_seqlens", change("cu_seqlens", lambda t: t.unsqueeze(0)), Raises(ValueError, "cu_seqlens")),
    Case("difftopk_packed", "k of the wrong length", put(k=torch.tensor([1, 2, 3])), Raises(ValueError, "k")),
    Case("difftopk", "no tokens", put(scores=_rand(3, 0), k=0), REFERENCE),
    Case("difftopk", "no rows", put(scores=_rand(0, 8)), REFERENCE),
    Case("difftopk_packed", "an empty segment", put(cu_seqlens=_cu(0, 0, 10), k=torch.tensor([0, 3])), REFERENCE),
    Case("topk_mask_packed", "no segments", put(scores=_rand(0), cu_seqlens=_cu(0), k=torch.zeros(0, dtype=torch.long)), REFERENCE),
    Case("difftopk", "k > N", put(k=9), Raises(ValueError, "k")),
    Case("difftopk", "k < 0", put(k=-1), Raises(ValueError, "k")),
    Case("topk_mask_packed", "k > n", put(k=torch.tensor([5, 3])), Raises(ValueError, "k")),
    Case("topk_mask_packed", "k < 0", put(k=torch.tensor([1, -3])), Raises(ValueError, "k")),
    Case("difftopk_packed", "cu_seqlens not from 0", put(cu_seqlens=_cu(1, 4, 10)), Raises(ValueError, "cu_seqlens")),
    Case("difftopk_packed", "cu_seqlens decreasing", put(cu_seqlens=_cu(0, 6, 4, 10), k=torch.tensor([0, 0, 0])), Raises(ValueError, "cu_seqlens")),
    Case("topk_mask_packed", "cu_seqlens past the end", put(cu_seqlens=_cu(0, 4, 11)), Raises(ValueError, "cu_seqlens")),
    Case("difftopk", "NaN scores", change("scores", with_value(3, NAN)), REFERENCE),
    Case("difftopk", "NaN scores, nan_policy='raise'", lambda kw: {**change("scores", with_value(3, NAN))(kw), "nan_policy": "raise"},
         Raises(ValueError, "scores")),
    Case("difftopk", "infinite scores", change("scores", lambda t: with_value(slice(0, 2), INF)(with_value(9, -INF)(t))), REFERENCE),
    Case("topk_mask", "NaN and inf scores", change("scores", lambda t: with_value(0, NAN)(with_value(1, INF)(t))), REFERENCE),
    Case("topk_mask", "unknown nan_policy", put(nan_policy="ignore"), Raises(ValueError, "nan_policy")),
    Case("DiffTopK", "cu_seqlens a list", lambda kw: {"scores": kw["scores"].view(-1), "cu_seqlens": [0, 24]}, Raises(TypeError, "cu_seqlens")),
    # constraint_loss
    Case("constraint_loss", "int soft", change("soft", lambda t: t.long()), Raises(TypeError, "soft")),
    Case("constraint_loss", "complex hard", change("hard", lambda t: t.to(torch.complex64)), Raises(TypeError, "hard")),
    Case("constraint_loss", "shapes differ", change("hard", lambda t: t[:, 1:]), Raises(ValueError, "soft and hard")),
    Case("constraint_loss", "NaN soft", change("soft", with_value(0, NAN)), REFERENCE),
    Case("constraint_loss", "soft at 0 and 1", change("soft", lambda t: (t > 0.5).float()), REFERENCE),
    # lis_score
    Case("lis_score", "int x", change("x", lambda t: t.long()), Raises(TypeError, "x")),
    Case("lis_score", "float64 q_weight", change("q_weight", lambda t: t.double()), Raises(TypeError, "q_weight")),
    Case("lis_score", "float64 everywhere", lambda kw: {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}, REFERENCE),
    Case("lis_score", "2-D x without cu_seqlens", change("x", lambda t: t[0]), Raises(ValueError, "x")),
    Case("lis_score", "3-D q_weight", change("q_weight", lambda t: t.unsqueeze(0)), Raises(ValueError, "q_weight")),
    Case("lis_score", "q_bias of the wrong size", change("q_bias", lambda t: t[1:]), Raises(ValueError, "q_bias")),
    Case("lis_score", "no tokens per sample", change("x", lambda t: t[:, :0]), Raises(ValueError, "x")),
    Case("lis_score", "no samples", change("x", lambda t: t[:0]), REFERENCE),
    Case("lis_score_packed", "an empty segment", put(cu_seqlens=_cu(0, 0, 7)), Raises(ValueError, "cu_seqlens")),
    Case("lis_score_packed", "cu_seqlens past the end", put(cu_seqlens=_cu(0, 3, 8)), Raises(ValueError, "cu_seqlens")),
    Case("lis_score", "NaN x", change("x", with_value(4, NAN)), REFERENCE),
    Case("lis_score", "infinite k_bias", change("k_bias", with_value(0, INF)), REFERENCE),
    # select_visual_tokens
    Case("select_visual_tokens", "int scores", change("scores", lambda t: t.long()), Raises(TypeError, "scores")),
    Case("select_visual_tokens", "float8 scores", change("scores", lambda t: t.to(f8)), Raises(TypeError, "scores")),
    Case("select_visual_tokens", "int visual_mask", change("visual_mask", lambda t: t.long()), Raises(TypeError, "visual_mask")),
    Case("select_visual_tokens", "visual_mask of another shape", change("visual_mask", lambda t: t[:, 1:]), Raises(ValueError, "visual_mask")),
    Case("select_visual_tokens", "budget 0", put(budget=0.0), Raises(ValueError, "budget")),
    Case("select_visual_tokens", "budget NaN", put(budget=NAN), Raises(ValueError, "budget")),
    Case("select_visual_tokens", "budget True", put(budget=True), Raises(TypeError, "budget")),
    Case("select_visual_tokens", "no tokens", lambda kw: {**kw, "scores": _rand(2, 0), "visual_mask": torch.zeros(2, 0, dtype=torch.bool)}, REFERENCE),
    Case("select_visual_tokens", "NaN and inf scores", change("scores", lambda t: with_value(1, NAN)(with_value(2, -INF)(t))), REFERENCE),
    # select_and_pack / select_and_pad
    Case("select_and_pack", "int keep", change("keep", lambda t: t.long()), Raises(TypeError, "keep")),
    Case("select_and_pack", "1-D keep", change("keep", lambda t: t[0]), Raises(ValueError, "keep")),
    Case("select_and_pack", "embeds of another shape", change("embeds", lambda t: t[:, 1:]), Raises(ValueError, r"tensors\[0\]")),
    Case("select_and_pack", "wrong counts", put(counts=[2, 4]), Raises(ValueError, "counts")),
    Case("select_and_pack", "float counts", put(counts=[3.0, 3]), Raises(TypeError, r"counts\[0\]")),
    Case("select_and_pack", "counts on meta", put(counts=torch.tensor([3, 3], device="meta")), Raises(ValueError, "counts")),
    Case("select_and_pack", "no samples", lambda kw: {"keep": kw["keep"][:0], "embeds": kw["embeds"][:0], "positions": kw["positions"][:, :0]}, REFERENCE),
    Case("select_and_pack", "NaN embeds", change("embeds", with_value(4, NAN)), REFERENCE),
    Case("select_and_pad", "pad_values True", put(pad_values=True), Raises(TypeError, "pad_values")),
    Case("select_and_pad", "pad_values a string", put(pad_values="0"), Raises(TypeError, "pad_values")),
    Case("select_and_pad", "a fraction for int labels", put(pad_values=(0, 0.5)), Raises(ValueError, r"pad_values\[1\]")),
    Case("select_and_pad", "NaN for int labels", put(pad_values=(0, NAN)), Raises(ValueError, r"pad_values\[1\]")),
    Case("select_and_pad", "too large for float16", lambda kw: {**kw, "embeds": kw["embeds"].half(), "pad_values": (1e6, 0)},
         Raises(ValueError, r"pad_values\[0\]")),
    Case("select_and_pad", "NaN padding of float embeds", put(pad_values=(NAN, -100)), REFERENCE),
    Case("select_and_pad", "padding side", put(padding_side="top"), Raises(ValueError, "padding_side")),
    # unpack
    Case("unpack", "int32 indices", change("indices", lambda t: t.int()), Raises(TypeError, "indices")),
    Case("unpack", "2-D indices", change("indices", lambda t: t.unsqueeze(0)), Raises(TypeError, "indices")),
    Case("unpack", "0-D packed", put(packed=torch.tensor(1.0)), Raises(ValueError, "packed")),
    Case("unpack", "float batch", put(batch=2.0), Raises(TypeError, "batch")),
    Case("unpack", "negative length", put(length=-1), Raises(ValueError, "length")),
    Case("unpack", "bool fill", put(fill=True), Raises(TypeError, "fill")),
    Case("unpack", "string fill", put(fill="0"), Raises(TypeError, "fill")),
    Case("unpack", "fractional fill of int rows", lambda kw: {**kw, "packed": torch.arange(15).view(5, 3), "fill": 0.5}, Raises(ValueError, "fill")),
    Case("unpack", "a repeated index", put(indices=torch.tensor([0, 2, 2, 7, 11])), Raises(ValueError, "indices")),
    Case("unpack", "an index past the end", put(indices=torch.tensor([0, 2, 3, 7, 12])), Raises(ValueError, "indices")),
    Case("unpack", "a negative index", put(indices=torch.tensor([-1, 2, 3, 7, 11])), Raises(ValueError, "indices")),
    Case("unpack", "more rows than batch * length", put(batch=0), Raises(ValueError, "batch")),
    Case("unpack", "no rows", put(packed=_rand(0, 3), indices=torch.zeros(0, dtype=torch.long)), REFERENCE),
    Case("unpack", "NaN fill", put(fill=NAN), REFERENCE),
    # attention_received
    Case("attention_received", "int q", change("q", lambda t: t.long()), Raises(TypeError, "q")),
    Case("attention_received", "k of another dtype", change("k", lambda t: t.double()), Raises(TypeError, "q and k")),
    Case("attention_received", "2-D q", change("q", lambda t: t[:, 0]), Raises(ValueError, "q")),
    Case("attention_received", "other heads", change("k", lambda t: t[:, :1]), Raises(ValueError, "q and k")),
    Case("attention_received", "bool scale", put(scale=True), Raises(TypeError, "scale")),
    Case("attention_received", "infinite scale", put(scale=INF), Raises(TypeError, "scale")),
    Case("attention_received", "cu_seqlens_q past the end", put(cu_seqlens_q=_cu(0, 2, 6)), Raises(ValueError, "cu_seqlens_q")),
    Case("attention_received", "segment counts differ", put(cu_seqlens_q=_cu(0, 5)), Raises(ValueError, "cu_seqlens_q and cu_seqlens_k")),
    Case("attention_received", "a segment without queries", put(cu_seqlens_q=_cu(0, 0, 5)), REFERENCE),
    Case("attention_received", "NaN q", change("q", with_value(0, NAN)), REFERENCE),
    # the methods' plain functions
    Case("divprune", "int x", change("x", lambda t: t.long()), Raises(TypeError, "x")),
    Case("norm", "float8 x", change("x", lambda t: t.to(f8)), Raises(TypeError, "x")),
    Case("divprune", "1-D x", change("x", lambda t: t[0]), Raises(ValueError, "x")),
    Case("divprune", "float k", put(k=2.5), Raises(TypeError, "k")),
    Case("divprune", "a float in a k list", put(k=[1, 2.5]), Raises(TypeError, r"k\[1\]")),
    Case("mean_attention", "float k tensor", put(k=torch.tensor([1.0, 2.0])), Raises(TypeError, "k")),
    Case("divprune", "k > n", put(k=4), Raises(ValueError, "k")),
    Case("norm", "k < 0", put(k=[-1, 2]), Raises(ValueError, "k")),
    Case("random", "k per segment of the wrong length", put(k=[1, 2, 3]), Raises(ValueError, "k")),
    Case("divprune", "cu_seqlens past the end", put(cu_seqlens=_cu(0, 3, 9)), Raises(ValueError, "cu_seqlens")),
    Case("divprune", "no tokens", put(x=_rand(0, 4), k=0, cu_seqlens=None), REFERENCE),
    Case("divprune", "NaN x", change("x", with_value(5, NAN)), REFERENCE),
    Case("norm", "inf x", change("x", with_value(5, INF)), REFERENCE),
    Case("visionzip", "int keys", change("keys", lambda t: t.long()), Raises(TypeError, "keys")),
    Case("visionzip", "2-D received", change("received", lambda t: t.unsqueeze(1)), Raises(TypeError, "received")),
    Case("visionzip", "k > n", put(k=9), Raises(ValueError, "k")),
    Case("visionzip", "NaN received", change("received", with_value(2, NAN)), REFERENCE),
    # budget_to_k
    Case("budget_to_k", "float n", change("n", lambda t: t.float()), Raises(TypeError, "n")),
    Case("budget_to_k", "negative n", put(n=torch.tensor([3, -1])), Raises(ValueError, "n")),
    Case("budget_to_k", "budget True", put(budget=True), Raises(TypeError, "budget")),
    Case("budget_to_k", "no lengths", put(n=torch.zeros(0, dtype=torch.long)), REFERENCE),
]

CASES = _generic_cases() + SPECIFIC


# --- running a case ------------------------------------------------------------------------------

def _tensors(result) -> list[torch.Tensor]:
    """The tensors of a result (a tensor, an int, a dataclass such as PackedBatch, or a tuple)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, int):
        return [torch.tensor(result)]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _tensors(item)]
    if dataclasses.is_dataclass(result):
        return _tensors([getattr(result, f.name) for f in dataclasses.fields(result)])
    return []


def _call(function: str, kwargs: dict, backend: str, monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", backend)
    fn, _ = FUNCTIONS[function]
    return fn(**kwargs)


def _assert_same(got, expected, exact: bool) -> None:
    got, expected = _tensors(got), _tensors(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and g.device == e.device
        if exact or not g.is_floating_point():
            assert torch.equal(g.nan_to_num(), e.nan_to_num()) and torch.equal(g.isnan(), e.isnan())
        else:
            atol = 1e-5 if g.dtype in (torch.float32, torch.float64) else torch.finfo(g.dtype).eps
            torch.testing.assert_close(g.double(), e.double(), atol=atol, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.function}: {c.what}" for c in CASES])
def test_bad_input(case: Case, backend, monkeypatch):
    _, make = FUNCTIONS[case.function]
    kwargs = case.mutate(make())
    if isinstance(case.expected, Raises):
        with pytest.raises(Exception) as caught:
            _call(case.function, kwargs, backend, monkeypatch)
        assert type(caught.value) is case.expected.error, caught.value
        assert caught.match(case.expected.names)
        return
    got = _call(case.function, kwargs, backend, monkeypatch)
    if case.expected is SAME:
        _assert_same(got, _call(case.function, make(), backend, monkeypatch), exact=True)
    else:
        _assert_same(got, _call(case.function, case.mutate(make()), "reference", monkeypatch), exact=False)


# --- cases outside the table -------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_constraint_loss_of_empty_masks_is_zero(reduction):
    soft = torch.empty(0, 5, requires_grad=True)
    loss = vsops.constraint_loss(soft, torch.empty(0, 5, dtype=torch.bool), reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0, 5)
        return
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert soft.grad is not None and soft.grad.shape == (0, 5)


def test_a_forced_backend_that_cannot_run_the_tensors(monkeypatch):
    """VSOPS_BACKEND=triton with CPU tensors outside the interpreter: a ValueError (still a
    RuntimeError, as before) naming the argument and what the backend runs."""
    monkeypatch.setenv("VSOPS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for call, name in [
        (lambda: vsops.topk_mask(_rand(2, 5), 1), "scores"),
        (lambda: vsops.lis_score(_rand(2, 5, 6), **_weights()), "x"),
        (lambda: select_and_pack(_keep(), _rand(2, 6, 3)), "keep"),
    ]:
        with pytest.raises(ValueError, match=f"cannot run {name} .*TRITON_INTERPRET=1") as caught:
            call()
        assert isinstance(caught.value, RuntimeError)


def test_a_triton_op_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="scores is on cpu; Triton kernels run CUDA tensors"):
        torch.ops.vsops.topk_mask_triton(_rand(2, 5), torch.tensor([1, 1]), None)


# --- the raw ops: one device for every tensor argument ----------------------------------------

def _raw_samples() -> dict[str, tuple]:
    """Valid arguments of every op (any backend's name maps to its operator's)."""
    cu = _cu(0, 2, 5)
    return {
        "difftopk_forward": (_rand(5), torch.tensor([1, 2]), cu),
        "difftopk_backward": (_rand(2, 5), _rand(2, 5, seed=1), torch.zeros(2, vsops.reference.ROW_STATE_WIDTH), None),
        "topk_mask": (_rand(2, 5), torch.tensor([1, 2]), None),
        "lis_segment_sum": (_rand(5, 4), _rand(5, seed=1), cu),
        "lis_segment_dot": (_rand(5, 4), _rand(2, 4, seed=1), _rand(2, seed=2), cu),
        "lis_weight_product": (_rand(2, 4), _rand(3, 4, seed=1), True),
        "lis_weight_grad": (_rand(2, 3), _rand(2, 4, seed=1), torch.float32),
        "lis_input_grad": (_rand(5), _rand(2, 4, seed=1), _rand(2, 4, seed=2), cu, torch.float32),
        "varlen_pack": (torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool), 3, [_rand(6, 2), torch.arange(6).view(6, 1)]),
        "varlen_unpack": (_rand(3, 2), torch.tensor([0, 2, 4]), 6, 0.0),
        "divprune_keep": (_rand(5, 4), torch.tensor([1, 1]), cu),
        "attention_received": (_rand(3, 2, 4), _rand(5, 2, 4, seed=1), _cu(0, 1, 3), cu, 0.5),
    }


def _tensor_slots(args) -> list[tuple[int, int | None]]:
    """(argument, list item or None) of every tensor among ``args``."""
    return [(i, j) for i, a in enumerate(args)
            for j, t in (enumerate(a) if isinstance(a, list) else [(None, a)]) if isinstance(t, torch.Tensor)]


def _to_meta(args, slot=None):
    """``args`` with the tensor at ``slot`` (every tensor when None) on meta."""
    def move(t, here):
        return t.to("meta") if isinstance(t, torch.Tensor) and (slot is None or here == slot) else t
    return tuple([move(t, (i, j)) for j, t in enumerate(a)] if isinstance(a, list) else move(a, (i, None))
                 for i, a in enumerate(args))


def _raw_ops():
    from vsops.ops import attention_received, difftopk, divprune, lis, registry, varlen  # noqa: F401  (registers them)

    return [(operator, backend) for operator in registry.OPERATORS for backend in operator.backends()]


RAW_OPS = _raw_ops()


@pytest.mark.parametrize("operator, backend", RAW_OPS, ids=[f"{o.name}-{b}" for o, b in RAW_OPS])
def test_raw_ops_refuse_a_mix_of_devices_and_trace_all_meta(operator, backend):
    args = _raw_samples()[operator.name]
    op = operator.op(backend)
    for slot in _tensor_slots(args):
        name = operator.argument_names[slot[0]] + ("" if slot[1] is None else rf"\[{slot[1]}\]")
        with pytest.raises(ValueError, match=f"{name} is on meta but .* is on cpu|.* is on cpu but {name} is on meta"):
            op(*_to_meta(args, slot))
    expected = _tensors(operator.op("reference")(*args))
    traced = _tensors(op(*_to_meta(args)))
    assert [(t.device.type, t.shape, t.dtype) for t in traced] == [("meta", e.shape, e.dtype) for e in expected]
