"""Fashion-MNIST reading and the `python -m clfast` demo, on generated IDX files (and the real ones if
installed)."""
import gzip
import os

import numpy as np
import pytest

from clfast.experiments import data


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _pattern(rng, y):
    """Noise, with a bright band of rows that depends on the class: something a few SGD steps learn."""
    x = rng.random((len(y), 28, 28)) * 60
    for c in range(10):
        x[y == c, 2 * c + 4:2 * c + 6] += 195
    return x.clip(0, 255)


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 1500), ("test", 300)):
        y = rng.integers(0, 10, n)
        x = _pattern(rng, y)
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


def _write_images(folder, gz, n_train=300, n_test=100, seed=0):
    """The four IDX files of an MNIST-like dataset, class-dependent so there is something to learn."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = _pattern(rng, y)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            path = os.path.join(folder, f"{prefix}-{kind}-ubyte")
            header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            opener = gzip.open if gz else open
            with opener(path + (".gz" if gz else ""), "wb") as f:
                f.write(header + arr.astype(np.uint8).tobytes())


def _write_cifar(root, dataset, n=100, seed=0):
    import pickle

    folder, train, test, key = data._CIFAR[dataset]
    classes = data.NUM_CLASSES[dataset]
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for name in train + test:
        y = rng.integers(0, classes, n)
        x = rng.random((n, 3072)) * 60
        width = 3072 // classes
        for c in range(classes):
            x[y == c, width * c:width * (c + 1)] += 150
        x = x.clip(0, 255).astype(np.uint8)
        with open(os.path.join(root, folder, name), "wb") as f:
            pickle.dump({b"data": x, key: y.tolist()}, f)


@pytest.fixture
def fake_datasets(tmp_path):
    """Tiny files in each layout the runner reads: MNIST (uncompressed) and KMNIST (gzipped) in torchvision's
    folders, Fashion-MNIST in torchvision's folder, CIFAR-10 and CIFAR-100 pickles."""
    _write_images(tmp_path / "MNIST" / "raw", gz=False, seed=1)
    _write_images(tmp_path / "KMNIST" / "raw", gz=True, seed=2)
    _write_images(tmp_path / "FashionMNIST" / "raw", gz=True, seed=3)
    _write_cifar(tmp_path, "cifar10")
    _write_cifar(tmp_path, "cifar100", n=200)
    return tmp_path


@pytest.mark.parametrize("dataset, shape", [("mnist", (28, 28, 1)), ("kmnist", (28, 28, 1)),
                                            ("fashion-mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                            ("cifar100", (32, 32, 3))])
def test_every_dataset_layout_is_read(fake_datasets, dataset, shape):
    x_tr, y_tr, x_te, y_te = data.load(dataset, str(fake_datasets))
    assert x_tr.dtype == np.uint8 and x_tr.shape[1:] == shape and len(x_tr) == len(y_tr)
    assert y_tr.dtype == np.int64 and 0 <= y_tr.min() and y_tr.max() < data.NUM_CLASSES[dataset]
    assert x_te.shape[1:] == shape and len(x_te) == len(y_te)


def test_cifar_pixels_keep_their_channel_order(tmp_path):
    _write_cifar(tmp_path, "cifar10", n=4)
    import pickle

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f)[b"data"]
    x = data.load("cifar10", str(tmp_path))[0]
    # CIFAR stores 1024 red, then green, then blue values per image
    assert np.array_equal(x[0, :, :, 1].ravel(), raw[0, 1024:2048])


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_a_missing_dataset_names_the_files_and_leaves_nothing_behind(tmp_path, dataset):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        data.load(dataset, str(tmp_path / "none"))
    for path in data.expected_files(dataset, str(tmp_path / "none")):
        assert path in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before
