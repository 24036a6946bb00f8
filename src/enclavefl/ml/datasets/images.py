"""Images to classify with a trained model: a folder of PNG/JPEG files, an IDX image file or a ``.npy`` array.

Every source gives float32 ``(N, C, H, W)`` pixels in [0, 1], the scale the
image loaders give the training data (pixel / 255), after checking that the
images have the size and channels the model takes: nothing is resized or
cropped, because a model scores a resized image without saying it saw
something else than it was trained on.

* A folder: its ``.png``, ``.jpg`` and ``.jpeg`` files (sorted by name; other
  files are skipped), converted to grey (one channel) or RGB (three) with
  Pillow, each checked for its size before it is decoded. Ids are file names.
* An IDX image file (magic 2051, plain or gzipped), as MNIST ships its images:
  one channel only. Ids are row numbers.
* A ``.npy`` file, read with ``allow_pickle=False`` (an object array is
  refused, never unpickled): ``(N, C, H, W)``, ``(N, H, W)`` for one channel, or
  ``(N, C*H*W)`` rows; uint8 pixels (scaled by 1/255) or floats already in [0, 1].
  Ids are row numbers.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ConfigError, DataError
from enclavefl.ml.datasets.idx import IMAGES_MAGIC, load_idx_images

__all__ = ["IMAGE_SUFFIXES", "ImageInputs", "load_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File name endings read from a folder (case-insensitive)."""

_MAX_IMAGES = 1_000_000


@dataclass(frozen=True, slots=True, eq=False)
class ImageInputs:
    """Images to classify: ``x`` float32 ``(N, C, H, W)`` in [0, 1]; ``names`` per image, or None (row numbers)."""

    x: npt.NDArray[np.float32]
    names: tuple[str, ...] | None


def _expected(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    one = f", (N, {h}, {w})" if c == 1 else ""
    return f"(N, {c}, {h}, {w}){one} or (N, {c * h * w})"


def load_images(path: Path, shape: tuple[int, int, int]) -> ImageInputs:
    """The images at ``path`` (a folder, an IDX image file or a ``.npy`` file) for a model taking ``shape``.

    Args:
        shape: ``(C, H, W)`` of one image, as the task's model takes it.

    Raises:
        ConfigError: a folder of images and Pillow is missing.
        DataError: the path is missing or of no known kind, or an image has
            another size, another channel count, or pixels outside [0, 1].
    """
    if path.is_dir():
        return _folder(path, shape)
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".npy":
        return ImageInputs(_npy(path, shape), None)
    if _has_idx_magic(path):
        return ImageInputs(_idx(path, shape), None)
    raise DataError(
        f"{path}: not a folder of images, a .npy file nor an IDX image file (magic {IMAGES_MAGIC}); "
        f"give one of these, holding images of shape {_expected(shape)}"
    )


def _has_idx_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(4)
            if head[:2] == b"\x1f\x8b":
                f.seek(0)
                with gzip.GzipFile(fileobj=f) as stream:
                    head = stream.read(4)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return len(head) == 4 and struct.unpack(">I", head)[0] == IMAGES_MAGIC


def _idx(path: Path, shape: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    c, h, w = shape
    images = load_idx_images(path, source_url="the task's data set")  # (N, 1, rows, cols) in [0, 1]
    if c != 1 or images.shape[2:] != (h, w):
        raise DataError(
            f"{path}: IDX images are 1x{images.shape[2]}x{images.shape[3]} (channels x height x width); "
            f"the model takes {c}x{h}x{w}"
        )
    return images


def _npy(path: Path, shape: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    c, h, w = shape
    try:
        # Memory-mapped: the header's shape and dtype are checked before any pixel is read.
        raw: Any = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from exc
    if not isinstance(raw, np.ndarray):
        raise DataError(f"{path}: holds {type(raw).__name__}, not one array")
    n = raw.shape[0] if raw.ndim else 0
    accepted = [(n, c, h, w), (n, c * h * w)] + ([(n, h, w)] if c == 1 else [])
    if raw.ndim == 0 or tuple(raw.shape) not in accepted:
        raise DataError(f"{path}: array of shape {tuple(raw.shape)}; the model takes {_expected(shape)}")
    # np.array copies out of the read-only memory map: the pixels outlive the file and can be written.
    if raw.dtype == np.uint8:
        x = np.array(raw, dtype=np.float32).reshape(n, c, h, w) / np.float32(255)
    elif raw.dtype.kind == "f":
        x = np.array(raw, dtype=np.float32).reshape(n, c, h, w)
        if not np.isfinite(x).all():
            raise DataError(f"{path}: holds a NaN or an infinity")
        if x.size and (float(x.min()) < 0 or float(x.max()) > 1):
            raise DataError(
                f"{path}: pixel values span {float(x.min()):g}..{float(x.max()):g}; the model takes [0, 1] "
                "(pixel / 255): scale the array, or store uint8 pixels"
            )
    else:
        raise DataError(f"{path}: dtype {raw.dtype}; expected uint8 pixels or floats in [0, 1]")
    return x


def _folder(path: Path, shape: tuple[int, int, int]) -> ImageInputs:
    c, h, w = shape
    if c not in (1, 3):
        raise DataError(f"{path}: images with {c} channels cannot be read from image files; give a .npy array")
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError(f"{path}: reading PNG/JPEG images needs Pillow: pip install 'enclavefl[ml]'") from exc
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    if len(files) > _MAX_IMAGES:
        raise DataError(f"{path}: {len(files)} images, more than {_MAX_IMAGES} at once; split the folder")
    x = np.empty((len(files), c, h, w), dtype=np.float32)  # (N, C, H, W)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                if image.size != (w, h):  # known from the header: checked before decoding
                    raise DataError(f"{file}: image of {image.size[0]}x{image.size[1]} pixels (width x height); "
                                    f"the model takes {w}x{h}, resize it first")
                pixels = np.asarray(image.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        except DataError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{file}: not a readable image ({exc})") from exc
        # (H, W) grey or (H, W, 3) RGB -> (C, H, W)
        x[i] = (pixels.reshape(h, w, c).transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
    return ImageInputs(x, tuple(f.name for f in files))
