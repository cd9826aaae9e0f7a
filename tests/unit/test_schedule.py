import math

import pytest

from llmtrain.train.schedule import learning_rate


def lr(step, schedule, total=100, warmup=10):
    return learning_rate(
        step, lr=1.0, min_lr=0.1, warmup=warmup, total=total, schedule=schedule, decay_fraction=0.2
    )


def test_linear_warmup_reaches_peak():
    assert lr(0, "cosine") == pytest.approx(0.1)
    assert lr(9, "cosine") == pytest.approx(1.0)


def test_cosine_midpoint_and_end():
    assert lr(10, "cosine") == pytest.approx(1.0)
    assert lr(55, "cosine") == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr(100, "cosine") == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    assert lr(50, "wsd") == 1.0
    assert lr(79, "wsd") == 1.0
    assert lr(90, "wsd") == pytest.approx(1.0 + (0.1 - 1.0) * 0.5)
    assert lr(100, "wsd") == pytest.approx(0.1)


def test_unknown_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="cosine, wsd, constant"):
        lr(20, "linear")
