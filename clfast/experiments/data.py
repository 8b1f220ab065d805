"""The runner's datasets, read from files already on disk with numpy: never a download.

* ``fashion-mnist``: the four IDX files, in ``DIR`` (Debian's ``apt-get install dataset-fashion-mnist`` puts them
  in ``/usr/share/datasets/fashion-mnist``) or in torchvision's ``DIR/FashionMNIST/raw``;
* ``mnist``, ``kmnist``: the same four IDX files (gzipped or not) in ``DIR/MNIST/raw`` / ``DIR/KMNIST/raw``, where
  torchvision and continuum keep them, or in ``DIR``;
* ``cifar10``, ``cifar100``: the python pickles in ``DIR/cifar-10-batches-py`` / ``DIR/cifar-100-python``.

Images come back as uint8 ``[N, H, W, C]`` and labels as int64 ``[N]``.
"""
from __future__ import annotations

import gzip
import os
import pickle
from typing import Dict, List, Optional, Tuple

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DATASETS = ("fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100")
NUM_CLASSES = {"fashion-mnist": 10, "mnist": 10, "kmnist": 10, "cifar10": 10, "cifar100": 100}
SHAPES = {"fashion-mnist": (28, 28, 1), "mnist": (28, 28, 1), "kmnist": (28, 28, 1), "cifar10": (32, 32, 3),
          "cifar100": (32, 32, 3)}
_IDX_FOLDERS = {"fashion-mnist": ("", "FashionMNIST/raw"), "mnist": ("MNIST/raw", ""), "kmnist": ("KMNIST/raw", "")}
_CIFAR = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
          "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels")}

Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def read_idx(path: str) -> np.ndarray:
    """One IDX file (gzipped or not) as an array: uint8 images ``[N, 28, 28]`` or labels ``[N]``."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: header promises {dims} ({expected} bytes) but the file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def default_dir(dataset: str) -> str:
    if dataset == "fashion-mnist":
        return os.environ.get("CLFAST_DATA_DIR") or DEFAULT_DIR
    return os.environ.get("CLFAST_DATA_DIR") or "./data"


def expected_files(dataset: str, data_dir: str) -> List[str]:
    """The files ``dataset`` is read from, in its first layout: what a missing-data message names."""
    if dataset in _CIFAR:
        folder, train, test, _ = _CIFAR[dataset]
        return [os.path.join(data_dir, folder, f) for f in train + test]
    return [os.path.join(data_dir, _IDX_FOLDERS[dataset][0], f) for f in FILES.values()]


def _find_idx(dataset: str, data_dir: str) -> Optional[Dict[str, str]]:
    for folder in _IDX_FOLDERS[dataset]:
        found = {}
        for key, name in FILES.items():
            for candidate in (name, name[:-3]):
                path = os.path.join(data_dir, folder, candidate)
                if os.path.exists(path):
                    found[key] = path
                    break
        if len(found) == len(FILES):
            return found
    return None


def _missing(dataset: str, data_dir: str) -> FileNotFoundError:
    hint = ("On Debian install it with `sudo apt-get install dataset-fashion-mnist`, or pass --data-dir / set "
            "CLFAST_DATA_DIR to a folder holding the four IDX files." if dataset == "fashion-mnist" else
            "Put them there (torchvision's and continuum's layout) and pass --data-dir; nothing is downloaded.")
    expected = ", ".join(expected_files(dataset, data_dir))
    return FileNotFoundError(f"{dataset} not found in {data_dir}: expected {expected} (the IDX files may also be "
                             f"uncompressed). {hint}")


def load(dataset: str, data_dir: Optional[str] = None) -> Arrays:
    """``(x_train [N, H, W, C] uint8, y_train [N] int64, x_test, y_test)`` of ``dataset`` from ``data_dir``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    data_dir = data_dir or default_dir(dataset)
    if dataset in _CIFAR:
        return _load_cifar(dataset, data_dir)
    paths = _find_idx(dataset, data_dir)
    if paths is None:
        raise _missing(dataset, data_dir)
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise ValueError(f"{data_dir}: {dataset} {split} images and labels differ in length")
        if arrays[f"{split}_images"].shape[1:] != (28, 28):
            raise ValueError(f"{paths[f'{split}_images']}: images of {arrays[f'{split}_images'].shape[1:]} pixels, "
                             "not 28x28")
    return (arrays["train_images"][..., None], arrays["train_labels"].astype(np.int64),
            arrays["test_images"][..., None], arrays["test_labels"].astype(np.int64))


def load_fashion_mnist(data_dir: Optional[str] = None) -> Arrays:
    """Fashion-MNIST as ``(x_train [60000, 28, 28] uint8, y_train int64, x_test [10000, 28, 28], y_test)``."""
    x_tr, y_tr, x_te, y_te = load("fashion-mnist", data_dir)
    return x_tr[..., 0], y_tr, x_te[..., 0], y_te


def _load_cifar(dataset: str, data_dir: str) -> Arrays:
    folder, train, test, label_key = _CIFAR[dataset]
    if not all(os.path.exists(p) for p in expected_files(dataset, data_dir)):
        raise _missing(dataset, data_dir)

    def read(names):
        xs, ys = [], []
        for name in names:
            path = os.path.join(data_dir, folder, name)
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            try:
                x = np.asarray(batch[b"data"], dtype=np.uint8)
                y = np.asarray(batch[label_key], dtype=np.int64)
            except (KeyError, TypeError):
                raise ValueError(f"{path} is not a {dataset} batch (no b'data' / {label_key!r})") from None
            if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
                raise ValueError(f"{path}: data of shape {x.shape} with {len(y)} labels, expected [N, 3072]")
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(y)
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    return (*read(train), *read(test))
