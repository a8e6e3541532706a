import numpy as np
import pytest
import torch

from alive.data import DataError, augment, batches, cifar10, load, mnist, moons


def test_moons_protocol():
    d = moons()
    assert d.x_train.shape == (85, 2) and d.x_test.shape == (15, 2)
    allx = torch.cat([d.x_train, d.x_test])
    assert torch.allclose(allx.max(0).values - allx.min(0).values, torch.ones(2))
    assert set(d.y_train.tolist()) == {0, 1}
    assert torch.equal(moons().x_train, d.x_train)  # random_state 42: deterministic
    assert moons(noise=0.1).x_train.shape == (85, 2)


def test_mnist_npz_complete(data_dir):
    d = mnist(scaling="raw")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.full and "mnist.npz" in d.source and d.x_train.max() == 255
    u = mnist(scaling="unit", n_train=100, n_test=10)
    assert u.x_train.shape[0] == 100 and "100 train / 10 test" in u.source
    assert torch.allclose(u.x_train, d.x_train[:100] / 255) and u.x_train.min() == 0 and u.x_train.max() == 1


def test_cifar_subset_and_require_full(data_dir):
    d = cifar10(scaling="standardize")
    assert d.x_train.shape == (5085, 3, 32, 32) and d.x_test.shape == (1017, 3, 32, 32)
    assert not d.full and "subset" in d.source
    mean = d.x_train.mean((0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(d.x_train.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    with pytest.raises(DataError, match="full cifar10"):
        cifar10(require_full=True)
    with pytest.raises(DataError, match="n_train=6000 but .* has only 5085 train images"):
        cifar10(n_train=6000)
    with pytest.raises(DataError, match="n_test=2000 .* only 1017 test images"):
        cifar10(n_test=2000)


def test_missing_and_damaged_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIVE_DATA", str(tmp_path))
    with pytest.raises(DataError, match="no npz file"):
        mnist(source="npz")
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((5, 28, 28), np.float32), y_train=np.zeros(5, np.int64),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="damaged: x_train"):
        mnist()
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((5, 28, 28), np.uint8), y_train=np.array([0, 1, 2, 10, 3]),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="damaged: y_train has labels from 0 to 10"):
        mnist()
    (tmp_path / "mnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot be read"):
        mnist()


def test_bad_arguments():
    with pytest.raises(ValueError, match="scaling"):
        mnist(scaling="minmax")
    with pytest.raises(ValueError, match="n_train"):
        mnist(n_train=-5)
    with pytest.raises(ValueError, match="unknown data set"):
        load("imagenet")


def test_batches_cover_every_index_once():
    g = torch.Generator().manual_seed(0)
    idx = torch.cat(list(batches(10, 3, g)))
    assert sorted(idx.tolist()) == list(range(10))
    assert [len(b) for b in batches(10, 3, g)] == [3, 3, 3, 1]
    assert len(list(batches(10, None, g))) == 1


def test_augment_flips_and_shifts_exactly():
    n, h, w = 16, 4, 5
    x = torch.arange(n * 2 * h * w, dtype=torch.float32).reshape(n, 2, h, w)
    out = augment(x, torch.Generator().manual_seed(3), flip=True, shift=0.5)  # up to 2 rows, 2 (round(2.5)) cols
    g = torch.Generator().manual_seed(3)  # the same draws, in augment's order
    flipped = torch.rand(n, generator=g) < 0.5
    dy = torch.randint(-2, 3, (n,), generator=g)
    dx = torch.randint(-2, 3, (n,), generator=g)
    assert 0 < int(flipped.sum()) < n and bool((dy != 0).any()) and bool((dx != 0).any())
    for i in range(n):
        img = x[i].flip(-1) if flipped[i] else x[i]
        rows = (torch.arange(h) - dy[i]).clamp(0, h - 1)  # a whole-pixel shift, the nearest edge repeated
        cols = (torch.arange(w) - dx[i]).clamp(0, w - 1)
        assert torch.equal(out[i], img[:, rows][:, :, cols]), i
    assert torch.equal(augment(x, torch.Generator().manual_seed(3), flip=False, shift=0.0), x)
