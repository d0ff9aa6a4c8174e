"""The λ_t curriculum, the learning-rate schedule, the composite loss and the mask
statistics, against values computed by hand."""
import math

import pytest
import torch

from vsops.training import composite_loss, constraint_weight, cosine_with_warmup, mask_statistics
from vsops.training.loop import SampleOrder, TrainConfig, resolve_precision


def test_constraint_weight_ramps_linearly_from_start_to_end():
    assert constraint_weight(0, 11) == pytest.approx(0.1)
    assert constraint_weight(5, 11) == pytest.approx(0.1 + 1.9 * 5 / 10)  # 1.05
    assert constraint_weight(10, 11) == pytest.approx(2.0)
    assert constraint_weight(11, 11) == pytest.approx(2.0)  # after the last step: held
    assert constraint_weight(3, 5, start=1.0, end=0.0) == pytest.approx(0.25)
    assert constraint_weight(0, 1) == pytest.approx(0.1)


def test_cosine_with_warmup_by_hand():
    # 100 steps, 3% warm-up: steps 0, 1, 2 ramp as 1/4, 2/4, 3/4, then cosine from 1 at step 3.
    assert [cosine_with_warmup(s, 100) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert cosine_with_warmup(3, 100) == pytest.approx(1.0)
    mid = 3 + 97 / 2
    assert cosine_with_warmup(int(mid), 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 3) / 97)))
    assert cosine_with_warmup(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(0, 10, warmup_ratio=0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [dict(step=-1, total_steps=5), dict(step=6, total_steps=5), dict(step=0, total_steps=0),
                                 dict(step=1.5, total_steps=5)])
def test_schedules_reject_bad_steps(bad):
    with pytest.raises(ValueError, match="step"):
        constraint_weight(**bad)
    with pytest.raises(ValueError, match="step"):
        cosine_with_warmup(**bad)


def test_composite_loss_is_ce_plus_weighted_constraint():
    ce, constraint = torch.tensor(2.5, requires_grad=True), torch.tensor(0.4, requires_grad=True)
    loss = composite_loss(ce, constraint, 1.5)
    assert loss.item() == pytest.approx(2.5 + 1.5 * 0.4)
    loss.backward()
    assert ce.grad.item() == 1.0 and constraint.grad.item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="weight"):
        composite_loss(ce, constraint, -1.0)
    with pytest.raises(ValueError, match="scalars"):
        composite_loss(torch.ones(2), constraint, 1.0)


def test_mask_statistics_by_hand():
    soft = torch.tensor([0.5, 0.5, 0.25, 0.75])
    hard = torch.tensor([True, False, False, True])
    stats = mask_statistics(soft, hard)
    h = lambda p: -(p * math.log2(p) + (1 - p) * math.log2(1 - p))  # noqa: E731
    assert stats["mask_mean"] == pytest.approx(0.5)
    assert stats["mask_entropy"] == pytest.approx((1 + 1 + h(0.25) + h(0.75)) / 4)
    assert stats["overlap"] == pytest.approx((0.5 + 0.75) / 2.0)
    binary = mask_statistics(torch.tensor([1.0, 0.0]), torch.tensor([True, False]))
    assert binary == pytest.approx({"mask_mean": 0.5, "mask_entropy": 0.0, "overlap": 1.0})


def test_config_split_and_errors():
    assert TrainConfig(batch_size=32).split(1) == (32, 1)
    assert TrainConfig(batch_size=32, micro_batch_size=4).split(2) == (4, 4)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        TrainConfig(batch_size=32).split(3)
    with pytest.raises(ValueError, match="micro-batches of 5"):
        TrainConfig(batch_size=32, micro_batch_size=5).split(1)
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(budget=0.0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_precision_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)


def test_sample_order_permutes_each_epoch_and_is_reproducible():
    order = SampleOrder(list(range(5)), seed=3)
    first, second = [order(p) for p in range(5)], [order(p) for p in range(5, 10)]
    assert sorted(first) == sorted(second) == list(range(5))
    assert first != second
    assert [SampleOrder(list(range(5)), seed=3)(p) for p in range(10)] == first + second
    assert SampleOrder(type("Endless", (), {"__getitem__": lambda self, i: i})(), seed=0)(123) == 123


def test_next_token_cross_entropy_pairs_each_position_with_the_next_label():
    from vsops.training.objective import next_token_cross_entropy

    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    labels = torch.tensor([[-100, 1, 0]])  # position 0 predicts label 1 (p 0.5), position 1 label 0 (p 0.9)
    expected = -(math.log(0.5) + math.log(0.9))
    assert next_token_cross_entropy(logits, labels, reduction="sum").item() == pytest.approx(expected)
    assert next_token_cross_entropy(logits, labels).item() == pytest.approx(expected / 2)
