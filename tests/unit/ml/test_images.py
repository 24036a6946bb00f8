"""Images to classify: folders, IDX and .npy files in, (N, C, H, W) in [0, 1] out; wrong shapes and pickles refused."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import DataError
from enclavefl.ml.datasets.images import load_images

PIL = pytest.importorskip("PIL.Image", reason="Pillow is not installed (ml extra)")


def _idx_images(path: Path, pixels: np.ndarray) -> Path:
    path.write_bytes(struct.pack(">IIII", 2051, *pixels.shape) + pixels.astype(np.uint8).tobytes())
    return path


def test_uint8_npy_is_scaled_to_unit_range(tmp_path: Path) -> None:
    # pixels 0, 51, 255 -> 0.0, 0.2, 1.0 (pixel / 255)
    pixels = np.zeros((2, 1, 28, 28), dtype=np.uint8)
    pixels[0, 0, 0, :3] = [0, 51, 255]
    np.save(tmp_path / "x.npy", pixels)

    inputs = load_images(tmp_path / "x.npy", (1, 28, 28))

    assert inputs.x.shape == (2, 1, 28, 28) and inputs.x.dtype == np.float32 and inputs.names is None
    np.testing.assert_allclose(inputs.x[0, 0, 0, :3], [0.0, 0.2, 1.0], rtol=1e-6)
    assert inputs.x.flags.writeable


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (3, 8, 8), (3, 64)])
def test_npy_takes_nchw_nhw_and_flat_rows_for_one_channel(tmp_path: Path, shape: tuple[int, ...]) -> None:
    values = np.linspace(0, 1, 192, dtype=np.float32).reshape(shape)
    np.save(tmp_path / "x.npy", values)

    inputs = load_images(tmp_path / "x.npy", (1, 8, 8))

    np.testing.assert_array_equal(inputs.x, values.reshape(3, 1, 8, 8))


def test_npy_of_another_shape_is_refused_naming_the_expected_ones(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 28, 28), dtype=np.float32))

    with pytest.raises(DataError, match=r"shape \(4, 3, 28, 28\); the model takes \(N, 1, 28, 28\), \(N, 28, 28\) or \(N, 784\)"):
        load_images(tmp_path / "x.npy", (1, 28, 28))


def test_npy_floats_outside_unit_range_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.full((1, 64), 16.0))  # sklearn's raw digits are 0..16

    with pytest.raises(DataError, match=r"pixel values span 16..16; the model takes \[0, 1\]"):
        load_images(tmp_path / "x.npy", (1, 8, 8))


def test_npy_with_nan_is_refused(tmp_path: Path) -> None:
    x = np.zeros((1, 64), dtype=np.float32)
    x[0, 3] = np.nan
    np.save(tmp_path / "x.npy", x)

    with pytest.raises(DataError, match="NaN or an infinity"):
        load_images(tmp_path / "x.npy", (1, 8, 8))


class _Boom:
    """Unpickling this writes a file: proof that a loader unpickled."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.flag), "unpickled"))  # type: ignore[return-value]


def test_an_object_npy_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    array = np.empty(1, dtype=object)
    array[0] = _Boom(str(flag))
    np.save(tmp_path / "x.npy", array, allow_pickle=True)

    with pytest.raises(DataError, match="not a readable .npy array"):
        load_images(tmp_path / "x.npy", (1, 8, 8))
    assert not flag.exists()


def test_a_pickle_named_npy_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    (tmp_path / "x.npy").write_bytes(pickle.dumps(_Boom(str(flag))))

    with pytest.raises(DataError, match="not a readable .npy array"):
        load_images(tmp_path / "x.npy", (1, 8, 8))
    assert not flag.exists()


def test_idx_images_plain_and_gzipped(tmp_path: Path) -> None:
    pixels = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    plain = _idx_images(tmp_path / "t10k-images-idx3-ubyte", pixels)
    zipped = tmp_path / "images.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))

    for path in (plain, zipped):
        inputs = load_images(path, (1, 28, 28))
        np.testing.assert_allclose(inputs.x[:, 0] * 255, pixels, atol=1e-4)


def test_idx_images_of_another_size_are_refused(tmp_path: Path) -> None:
    path = _idx_images(tmp_path / "images", np.zeros((1, 8, 8)))

    with pytest.raises(DataError, match="IDX images are 1x8x8 .*; the model takes 1x28x28"):
        load_images(path, (1, 28, 28))
    with pytest.raises(DataError, match="the model takes 3x8x8"):
        load_images(path, (3, 8, 8))


def test_a_folder_of_png_and_jpeg_images_in_name_order(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    PIL.fromarray(grey).save(tmp_path / "b.png")
    PIL.fromarray(grey[::-1].copy()).save(tmp_path / "a.PNG")
    PIL.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(tmp_path / "c.jpg", quality=100)
    (tmp_path / "notes.txt").write_text("skipped")

    inputs = load_images(tmp_path, (1, 8, 8))

    assert inputs.names == ("a.PNG", "b.png", "c.jpg")
    np.testing.assert_allclose(inputs.x[1, 0] * 255, grey, atol=1e-4)
    np.testing.assert_allclose(inputs.x[0, 0] * 255, grey[::-1], atol=1e-4)
    assert abs(float(inputs.x[2].mean()) * 255 - 200) < 2  # JPEG is lossy


def test_a_colour_image_is_read_as_rgb_channels(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 51
    PIL.fromarray(rgb).save(tmp_path / "red.png")

    inputs = load_images(tmp_path, (3, 32, 32))

    # (H, W, C) pixels -> (C, H, W) / 255: red 1.0, green 0.0, blue 0.2
    np.testing.assert_allclose(inputs.x[0, :, 0, 0], [1.0, 0.0, 0.2], rtol=1e-6)


def test_an_image_of_another_size_is_refused_naming_the_file(tmp_path: Path) -> None:
    PIL.fromarray(np.zeros((30, 28), dtype=np.uint8)).save(tmp_path / "tall.png")

    with pytest.raises(DataError, match=r"tall.png: image of 28x30 pixels \(width x height\); the model takes 28x28"):
        load_images(tmp_path, (1, 28, 28))


def test_a_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x")

    with pytest.raises(DataError, match="no image files"):
        load_images(tmp_path, (1, 28, 28))


def test_a_broken_image_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")

    with pytest.raises(DataError, match="bad.png: not a readable image"):
        load_images(tmp_path, (1, 28, 28))


def test_a_file_of_no_known_kind_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("1,2,3\n")

    with pytest.raises(DataError, match=r"not a folder of images, a .npy file nor an IDX image file"):
        load_images(tmp_path / "rows.csv", (1, 28, 28))
    with pytest.raises(DataError, match="no such file or folder"):
        load_images(tmp_path / "absent", (1, 28, 28))
