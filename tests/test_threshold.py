"""The threshold law λ = scale_factor / L and its validation."""

import math

import pytest
import torch

from blasst_kernels import log_lambda, validate_scale_factor


def test_inverse_law_per_sequence():
    lam = log_lambda(100.0, torch.tensor([1000, 4000, 50, 100]), num_heads=2)
    assert lam.shape == (4, 2) and lam.dtype == torch.float32
    assert torch.allclose(lam[0], torch.tensor(math.log(0.1)))
    assert torch.allclose(lam[1], torch.tensor(math.log(0.025)))
    assert torch.isinf(lam[2:]).all() and (lam[2:] < 0).all()  # λ >= 1: dense


@pytest.mark.parametrize("dense", [None, 0, 0.0, [0.0, 0.0]])
def test_dense_factors(dense):
    assert validate_scale_factor(dense) is None
    assert torch.isneginf(log_lambda(dense, [10, 20], 2)).all()


def test_per_head_factors():
    lam = log_lambda([0.0, 10.0, 20.0], [100], 3)[0]
    assert torch.isneginf(lam[0]) and torch.allclose(lam[1:], torch.tensor([math.log(0.1), math.log(0.2)]))


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf"), [1.0, float("nan")], "x", True, [[1.0]]])
def test_bad_factors_name_the_value(bad):
    with pytest.raises(ValueError, match="scale_factor"):
        validate_scale_factor(bad)


def test_wrong_number_of_heads():
    with pytest.raises(ValueError, match="num_heads=4"):
        log_lambda([1.0, 2.0, 3.0], [10], 4)
