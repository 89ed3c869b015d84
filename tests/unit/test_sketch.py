import numpy as np
import pytest
import torch

from atlasfl.phases.sketch import count_sketch, count_sketch_rows


def test_linear():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    left = count_sketch(a + 2 * b, seed=3, chunk=1024)
    right = count_sketch(a, seed=3, chunk=1024) + 2 * count_sketch(b, seed=3, chunk=1024)
    assert torch.allclose(left, right, atol=1e-4)


def test_deterministic_and_seeded():
    v = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(count_sketch(v, seed=5), count_sketch(v.clone(), seed=5))
    assert not torch.equal(count_sketch(v, seed=5), count_sketch(v, seed=6))
    out = count_sketch(v.double(), dim=32)
    assert out.shape == (32,) and out.dtype == torch.float32


def test_each_coordinate_lands_in_one_bucket_with_a_sign():
    for i in (0, 7, 2047):
        e = torch.zeros(2048)
        e[i] = 3.0
        s = count_sketch(e, dim=16, seed=2, chunk=512)
        assert int((s != 0).sum()) == 1 and float(s.abs().sum()) == 3.0


def test_inner_products_preserved_in_expectation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, generator=g, dtype=torch.float64)
    b = 0.6 * a + 0.8 * torch.randn(2000, generator=g, dtype=torch.float64)
    exact = float(a @ b)
    estimates = np.array([float(count_sketch(a, seed=s) @ count_sketch(b, seed=s)) for s in range(300)])
    # Var ≈ (‖a‖²‖b‖² + ⟨a,b⟩²)/dim for one sketch; the mean of 300 sits within 4 standard errors.
    std_err = np.sqrt((float(a @ a) * float(b @ b) + exact**2) / 64 / 300)
    assert abs(estimates.mean() - exact) < 4 * std_err
    norms = np.array([float(count_sketch(a, seed=s).norm() ** 2) for s in range(50)])
    assert abs(norms.mean() / float(a @ a) - 1) < 0.1


def test_three_million_coordinates_over_three_chunks():
    v = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0))
    out = count_sketch(v, seed=0)
    assert out.shape == (64,) and torch.isfinite(out).all()
    assert abs(float(out.norm() ** 2) / float(v.norm() ** 2) - 1) < 0.5
    # Each chunk has its own bucket map, so moving the coordinates to another chunk changes the sketch.
    assert not torch.allclose(out, count_sketch(v, seed=0, chunk=3_000_000))


def test_rejects_non_vectors():
    with pytest.raises(ValueError):
        count_sketch(torch.zeros(3, 3))


def test_rows_sketched_like_vectors():
    rows = torch.randn(5, 3000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = count_sketch_rows(rows, dim=16, seed=9, chunk=1024)
    assert out.shape == (5, 16) and out.dtype == torch.float64
    for i in range(5):
        assert torch.allclose(out[i].float(), count_sketch(rows[i], dim=16, seed=9, chunk=1024), atol=1e-5)
    with pytest.raises(ValueError):
        count_sketch_rows(torch.zeros(3))
