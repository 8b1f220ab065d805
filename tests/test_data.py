"""Fashion-MNIST reading and the `python -m clfast` demo, on generated IDX files (and the real ones if
installed)."""
import gzip
import os

import numpy as np
import pytest

from clfast import data


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("test", 200)):
        y = rng.integers(0, 10, n)
        # class-dependent images so the demo has something to learn
        x = (rng.random((n, 28, 28)) * 60 + (y[:, None, None] * 19)).clip(0, 255)
        prefix = "train" if split == "train" else "t10k"
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", y)
    return tmp_path


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(data.read_idx(str(tmp_path / "a.gz")), a)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="header promises"):
        data.read_idx(str(tmp_path / "bad"))


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not os.path.exists(os.path.join(data.DEFAULT_DIR, data.FILES["train_images"])),
                    reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    x_tr, y_tr, x_te, y_te = data.load_fashion_mnist()
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28)
    assert np.bincount(y_tr).tolist() == [6000] * 10 and np.bincount(y_te).tolist() == [1000] * 10
