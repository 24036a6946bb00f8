"""The download conventions: 8-bit blocks (error bound, refusals) and changed rows applied to a cached copy."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.download_codec import (
    NO_MODEL,
    QUANT_BLOCK,
    QUANT_PARAMS_PREFIX,
    dequantize,
    quantize,
    quantize_download,
    resolve_download,
)
from enclavefl.errors import ProtocolError
from enclavefl.tensors import ParamSet, SparseRows


def test_quantize_codes_a_tiny_block_as_computed_by_hand() -> None:
    # Prepare: one block, min 0, max 2.55, so step = 2.55 / 255 = 0.01.
    values = np.asarray([0.0, 1.0, 2.55, 0.004, 0.006], dtype=np.float32)

    # Execute
    coded = quantize(values)

    # Assert: codes = round((x - 0) / 0.01) = 0, 100, 255, 0 (0.4 rounds down), 1 (0.6 rounds up).
    assert coded is not None
    codes, params = coded
    assert codes.tolist() == [0, 100, 255, 0, 1]
    assert params.dtype == np.float32 and params.shape == (1, 2)
    assert params[0, 0] == 0.0 and params[0, 1] == pytest.approx(0.01)
    assert dequantize(codes, params).tolist() == pytest.approx([0.0, 1.0, 2.55, 0.0, 0.01], abs=1e-6)


def test_quantization_error_is_at_most_half_a_step_per_block() -> None:
    # Prepare: three blocks of very different ranges (the last one shorter).
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, QUANT_BLOCK), rng.normal(0, 100, QUANT_BLOCK),
                             rng.normal(5, 0.01, 17)]).astype(np.float32).reshape(-1, 1)

    # Execute
    coded = quantize(values)
    assert coded is not None
    restored = dequantize(*coded)

    # Assert: per block, |x - x'| <= step / 2 (plus float32 rounding of lo + q * step).
    assert restored.shape == values.shape and restored.dtype == np.float32
    steps = np.repeat(coded[1][:, 1], QUANT_BLOCK)[: values.size]
    error = np.abs(restored.reshape(-1).astype(np.float64) - values.reshape(-1))
    assert np.all(error <= steps / 2 * (1 + 1e-4) + 1e-6 * np.abs(values.reshape(-1)))


def test_a_constant_block_is_restored_exactly() -> None:
    values = np.full(10, 3.25, dtype=np.float64)
    coded = quantize(values)
    assert coded is not None
    assert coded[1].tolist() == [[3.25, 0.0]]
    assert np.array_equal(dequantize(*coded), values)


@pytest.mark.parametrize("values", [np.asarray([1.0, np.nan], dtype=np.float32), np.arange(4, dtype=np.int32),
                                    np.zeros(0, dtype=np.float32)])
def test_what_cannot_be_quantized_stays_dense(values: np.ndarray) -> None:
    assert quantize(values) is None


def test_quantize_download_keeps_small_tensors_and_adds_block_parameters_after_each_coded_one() -> None:
    # Prepare
    params = ParamSet({"w": np.ones((QUANT_BLOCK * 2 + 1,), dtype=np.float32), "b": np.ones(3, dtype=np.float32)})

    # Execute
    download = quantize_download(params)

    # Assert: w as codes + 3 blocks of (lo, step); b dense. 2049 + 24 + 12 bytes against 8208.
    assert list(download) == ["w", f"{QUANT_PARAMS_PREFIX}w", "b"]
    assert download["w"].dtype == np.uint8
    assert download[f"{QUANT_PARAMS_PREFIX}w"].shape == (3, 2)
    assert download.nbytes == 2049 + 24 + 12


def test_resolve_download_decodes_and_drops_block_parameters() -> None:
    params = ParamSet({"w": np.linspace(-1, 1, 3000, dtype=np.float32), "b": np.ones(3, dtype=np.float32)})
    resolved = resolve_download(quantize_download(params), None, NO_MODEL)
    assert list(resolved) == ["w", "b"]
    assert np.abs(resolved["w"] - params["w"]).max() <= (2 / 255) / 2 * 1.001


def test_dequantize_refuses_block_parameters_of_the_wrong_shape() -> None:
    with pytest.raises(ProtocolError, match=r"shape \(2, 2\)"):
        dequantize(np.zeros(QUANT_BLOCK + 1, dtype=np.uint8), np.zeros((1, 2), dtype=np.float32))


def test_dequantize_refuses_a_block_parameter_that_is_not_finite() -> None:
    with pytest.raises(ProtocolError, match="not finite"):
        dequantize(np.zeros(4, dtype=np.uint8), np.asarray([[0.0, np.inf]], dtype=np.float32))


def test_block_parameters_that_follow_no_tensor_are_refused() -> None:
    download = ParamSet({"a": np.zeros(4, dtype=np.uint8), f"{QUANT_PARAMS_PREFIX}w": np.zeros((1, 2), np.float32)})
    with pytest.raises(ProtocolError, match="does not follow"):
        resolve_download(download, None, NO_MODEL)


def test_changed_rows_are_applied_to_the_cached_copy_without_writing_to_it() -> None:
    # Prepare: the copy of version 3 and a download with rows 0 and 2 changed.
    base = ParamSet({"t": np.arange(8, dtype=np.float32).reshape(4, 2), "b": np.zeros(2, np.float32)})
    rows = SparseRows(np.asarray([0, 2]), np.asarray([[10, 11], [14, 15]], dtype=np.float32), (4, 2))
    download = ParamSet({"t": rows, "b": np.ones(2, np.float32)})

    # Execute
    resolved = resolve_download(download, base, 3)

    # Assert: rows 1 and 3 from the copy, 0 and 2 from the download; the copy is unchanged.
    assert resolved["t"].tolist() == [[10, 11], [2, 3], [14, 15], [6, 7]]
    assert resolved["b"].tolist() == [1, 1]
    assert base["t"].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_changed_rows_without_a_cached_copy_are_refused() -> None:
    download = ParamSet({"t": SparseRows(np.asarray([1]), np.ones((1, 2), np.float32), (4, 2))})
    with pytest.raises(ProtocolError, match="holds no model"):
        resolve_download(download, None, NO_MODEL)


def test_changed_rows_of_another_shape_than_the_copy_are_refused() -> None:
    base = ParamSet({"t": np.zeros((3, 2), np.float32)})
    download = ParamSet({"t": SparseRows(np.asarray([1]), np.ones((1, 2), np.float32), (4, 2))})
    with pytest.raises(ProtocolError, match=r"float32 \(4, 2\).*\(3, 2\)"):
        resolve_download(download, base, 5)


def test_changed_rows_of_another_dtype_than_the_copy_are_refused() -> None:
    base = ParamSet({"t": np.zeros((4, 2), np.float64)})
    download = ParamSet({"t": SparseRows(np.asarray([1]), np.ones((1, 2), np.float32), (4, 2))})
    with pytest.raises(ProtocolError, match="float64"):
        resolve_download(download, base, 5)


def test_a_tensor_longer_than_one_chunk_of_blocks_keeps_the_bound_across_chunk_edges() -> None:
    # Prepare: 300 blocks and 5 values (chunks of 256 blocks), values growing so each block has its own range.
    values = (np.arange(300 * QUANT_BLOCK + 5, dtype=np.float64) ** 1.5).astype(np.float32)

    # Execute
    coded = quantize(values)
    assert coded is not None
    codes, params = coded
    restored = dequantize(codes, params)

    # Assert
    assert params.shape == (301, 2)
    steps = np.repeat(params[:, 1].astype(np.float64), QUANT_BLOCK)[: values.size]
    error = np.abs(restored.astype(np.float64) - values)
    assert np.all(error <= steps / 2 * (1 + 1e-4) + 1e-6 * np.abs(values))
