"""Fashion-MNIST from its four IDX files, read with numpy, no download.

On Debian: ``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``.
"""
from __future__ import annotations

import gzip
import os
from typing import Optional, Tuple

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


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


def load_fashion_mnist(data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train [60000, 28, 28] uint8, y_train [60000] int64, x_test [10000, 28, 28], y_test [10000])``."""
    data_dir = data_dir or os.environ.get("CLFAST_DATA_DIR") or DEFAULT_DIR
    missing = [name for name in FILES.values() if not os.path.exists(os.path.join(data_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {data_dir} (missing {', '.join(missing)}). On Debian install it with "
            "`sudo apt-get install dataset-fashion-mnist`, or pass --data-dir / set CLFAST_DATA_DIR to a folder "
            "holding the four IDX files.")
    arrays = {k: read_idx(os.path.join(data_dir, v)) for k, v in FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise ValueError(f"{data_dir}: {split} images and labels differ in length")
    return (arrays["train_images"], arrays["train_labels"].astype(np.int64), arrays["test_images"],
            arrays["test_labels"].astype(np.int64))
