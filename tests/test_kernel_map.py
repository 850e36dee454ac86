"""scanet.data.kernel_map: the Nystroem RBF map against a float64 kernel computed here, on fresh random inputs."""

import numpy as np
import pytest

from scanet.data.kernel_map import rbf_kernel_map


def _rbf(a, b, mean, std):
    """exp(-||za - zb||^2 / D) of the training-standardized rows, one pair at a time (the slow, plain way)."""
    za, zb = (a - mean) / std, (b - mean) / std
    out = np.empty((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = np.exp(-np.sum((za[i] - zb[j]) ** 2) / a.shape[1])
    return out


@pytest.mark.parametrize("n, n_test, d, tol", [(37, 11, 5, 2e-5), (3, 1, 128, 2e-5), (64, 9, 1, 1e-3)])
def test_dot_products_are_the_kernel_where_the_landmarks_are_all_training_rows(n, n_test, d, tol):
    rng = np.random.default_rng(n * 1000 + d)
    train, test = rng.random((n, d)) * 3.0, rng.random((n_test, d)) * 3.0 - 0.5
    phi_train, phi_test = rbf_kernel_map(train, [test])
    assert phi_train.dtype == np.float32 and phi_test.dtype == np.float32
    assert phi_train.shape == (n, n) and phi_test.shape == (n_test, n)  # one column per landmark
    mean, std = train.mean(0), train.std(0)
    # Nystroem is exact when one side of the pair is a landmark (here every training row is one), up to the
    # eigenvalues dropped: 64 points on a line keep rank 10, and a row off the landmarks then differs by ~2e-4.
    np.testing.assert_allclose(phi_train.astype(np.float64) @ phi_train.T, _rbf(train, train, mean, std), atol=2e-5)
    np.testing.assert_allclose(phi_test.astype(np.float64) @ phi_train.T, _rbf(test, train, mean, std), atol=tol)


def test_a_seeded_landmark_sample_is_exact_on_its_landmarks_and_reproducible():
    rng = np.random.default_rng(7)
    train, test = rng.normal(size=(50, 6)), rng.normal(size=(4, 6))
    a_train, a_test = rbf_kernel_map(train, [test], max_landmarks=12, seed=3)
    b_train, b_test = rbf_kernel_map(train, [test], max_landmarks=12, seed=3)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_test, b_test)
    assert a_train.shape == (50, 12)
    c_train, _ = rbf_kernel_map(train, [test], max_landmarks=12, seed=4)
    assert not np.allclose(a_train @ a_train.T, c_train @ c_train.T)
    # the landmarks are the rows whose inner products with every row are exact: find them and check
    K = _rbf(train, train, train.mean(0), train.std(0))
    err = np.abs(a_train.astype(np.float64) @ a_train.T - K).max(axis=1)
    assert (err < 2e-5).sum() >= 12
    assert err.max() > 1e-3  # the other rows are approximated, not exact


def test_duplicate_rows_and_constant_columns_keep_the_map_finite():
    rng = np.random.default_rng(1)
    base = rng.random((10, 4))
    train = np.concatenate([base, base[:5]])  # 5 duplicates: the landmarks' kernel matrix has rank 10
    train[:, 2] = 0.25  # a constant column
    (phi,) = rbf_kernel_map(train)
    assert np.isfinite(phi).all()
    assert phi.shape == (15, 15) and np.linalg.matrix_rank(phi.astype(np.float64), tol=1e-4) == 10
    np.testing.assert_allclose(phi[10:], phi[:5], atol=1e-5)


def test_the_test_rows_do_not_shape_the_map():
    rng = np.random.default_rng(2)
    train = rng.random((20, 8))
    test = rng.random((5, 8))
    a_train, a_test = rbf_kernel_map(train, [test])
    b_train, b_test = rbf_kernel_map(train, [np.concatenate([test * 0 + 9.0, test[:2]])])
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_test[:2], b_test[5:])


def test_bad_input_is_refused_with_what_and_where():
    good = np.random.default_rng(3).random((6, 3))
    with pytest.raises(ValueError, match=r"feats.mat: rows of set 1 contain NaN or inf"):
        rbf_kernel_map(good, [np.array([[0.1, np.nan, 0.2]])], what="feats.mat")
    with pytest.raises(ValueError, match=r"rows of set 1 have shape \(2, 4\), expected \(n, 3\)"):
        rbf_kernel_map(good, [np.zeros((2, 4))])
    with pytest.raises(ValueError, match=r"needs a \(n >= 2, D >= 1\) training matrix, got \(1, 3\)"):
        rbf_kernel_map(good[:1])
    with pytest.raises(ValueError, match=r"training rows contain NaN or inf"):
        rbf_kernel_map(np.where(good > 0.5, np.inf, good))
    with pytest.raises(ValueError, match=r"max_landmarks must be >= 2, got 1"):
        rbf_kernel_map(good, max_landmarks=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_column_turns_into_a_fingerprint_of_the_training_rows(seed):
    # Standardized per column against the training rows (as SCANet's image encoder does), new rows stay in range:
    # 200 rows in 4-D keep many eigenvalues near the floor, and columns along those principal directions (the
    # shorter diag(s)^(-1/2) U^T form) reach 33-86 standard deviations here; one column per landmark, 8-11.
    rng = np.random.default_rng(seed)
    phi_train, phi_test = rbf_kernel_map(rng.random((200, 4)), [rng.random((50, 4))])
    z = (phi_test - phi_train.mean(0)) / phi_train.std(0)
    assert np.abs(z).max() < 20
