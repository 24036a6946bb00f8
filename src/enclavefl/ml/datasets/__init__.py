"""Dataset loaders for the reference workloads' real file formats; nothing is downloaded.

Every loader returns numpy arrays (images NCHW float32 in [0, 1], labels
int64) and raises :class:`~enclavefl.errors.DataError` naming the file, what
was expected and where to get the official data.
"""

from __future__ import annotations

from enclavefl.ml.datasets.arrays import (
    ArrayDataset,
    FederatedDataset,
    IndexArray,
    concatenate,
    flatten_federated,
)
from enclavefl.ml.datasets.cifar import (
    CIFAR10_URL,
    load_cifar10,
    load_cifar10_binary_batch,
    load_cifar10_python_batch,
)
from enclavefl.ml.datasets.criteo import CRITEO_URL, NUM_CATEGORICAL, NUM_DENSE, CriteoData, iter_criteo, load_criteo
from enclavefl.ml.datasets.femnist import LEAF_URL, load_femnist, load_leaf_json
from enclavefl.ml.datasets.images import ImageInputs, load_images
from enclavefl.ml.datasets.idx import (
    FASHION_MNIST_URL,
    MNIST_URL,
    load_fashion_mnist,
    load_idx_images,
    load_idx_labels,
    load_mnist,
)

__all__ = [
    "CIFAR10_URL",
    "CRITEO_URL",
    "FASHION_MNIST_URL",
    "LEAF_URL",
    "MNIST_URL",
    "NUM_CATEGORICAL",
    "NUM_DENSE",
    "ArrayDataset",
    "CriteoData",
    "FederatedDataset",
    "ImageInputs",
    "IndexArray",
    "concatenate",
    "flatten_federated",
    "iter_criteo",
    "load_cifar10",
    "load_cifar10_binary_batch",
    "load_cifar10_python_batch",
    "load_criteo",
    "load_fashion_mnist",
    "load_femnist",
    "load_idx_images",
    "load_idx_labels",
    "load_images",
    "load_leaf_json",
    "load_mnist",
]
