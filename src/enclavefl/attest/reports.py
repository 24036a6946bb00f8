"""Fixed-layout parts of a DCAP quote: the 48-byte header and the SGX / TD report bodies.

How this works: each part is a frozen dataclass plus a layout table of
``(field, size, kind)``; parsing and serialising walk the same table, so they are
exact inverses, and ``__post_init__`` refuses wrong sizes so ``to_bytes()`` cannot
fail. :class:`QuoteReader` is the bounded cursor every quote read goes through: it
knows the absolute offset and raises :class:`QuoteFormatError` (field + offset)
instead of letting an ``IndexError`` out. All integers are little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enclavefl.errors import AttestationError

__all__ = [
    "ATT_KEY_TYPE_ECDSA_P256",
    "HEADER_SIZE",
    "INTEL_QE_VENDOR_ID",
    "QuoteFormatError",
    "QuoteHeader",
    "QuoteReader",
    "SGX_REPORT_SIZE",
    "SgxAttributes",
    "SgxReportBody",
    "TD_REPORT_SIZE",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "TdReportBody",
    "decode_layout",
]

HEADER_SIZE = 48
SGX_REPORT_SIZE = 384
TD_REPORT_SIZE = 584
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
#: Intel's Quoting Enclave vendor id; the QVL refuses any other.
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
_SGX_FLAG_DEBUG = 0x02


class QuoteFormatError(AttestationError):
    """A quote (or one of its parts) does not follow the DCAP layout.

    Attributes:
        field: dotted name of the offending field (``signature_data.qe_auth_data``).
        offset: absolute byte offset in the quote, or None when building from parts.
        detail: what was wrong.
    """

    def __init__(self, field: str, offset: int | None, detail: str) -> None:
        self.field = field
        self.offset = offset
        self.detail = detail
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"quote field {field}{where}: {detail}")


class QuoteReader:
    """Bounded cursor over a quote; every read checks the bytes are there."""

    __slots__ = ("_data", "_end", "pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self.pos = start
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def take(self, size: int, field: str) -> bytes:
        if size > self.remaining:
            raise QuoteFormatError(field, self.pos, f"needs {size} bytes, only {self.remaining} left")
        chunk = self._data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "little")

    def sub(self, size: int, field: str) -> QuoteReader:
        """A reader over the next ``size`` bytes (checked before anything is sliced)."""
        if size > self.remaining:
            raise QuoteFormatError(field, self.pos, f"declares {size} bytes, only {self.remaining} left")
        child = QuoteReader(self._data, self.pos, self.pos + size)
        self.pos += size
        return child

    def expect_end(self, field: str) -> None:
        if self.remaining:
            raise QuoteFormatError(field, self.pos, f"{self.remaining} unexpected bytes after its last part")


# A layout is (field name, size in bytes, kind): "b" raw bytes, "u" little-endian unsigned int,
# "a" SgxAttributes. Parse and serialise walk the same table, which keeps them exact inverses.
_Layout = tuple[tuple[str, int, str], ...]


def _check_values(obj: object, layout: _Layout) -> None:
    """Refuse wrong sizes/ranges when a value object is built, so to_bytes() cannot fail."""
    name = type(obj).__name__
    for field_name, size, kind in layout:
        value = getattr(obj, field_name)
        if kind == "b" and (not isinstance(value, bytes) or len(value) != size):
            actual = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
            raise QuoteFormatError(f"{name}.{field_name}", None, f"must be {size} bytes, got {actual}")
        if kind == "u" and (not isinstance(value, int) or not 0 <= value < 1 << (8 * size)):
            detail = f"must be an unsigned {8 * size}-bit int, got {value!r}"
            raise QuoteFormatError(f"{name}.{field_name}", None, detail)
        if kind == "a" and not isinstance(value, SgxAttributes):
            raise QuoteFormatError(f"{name}.{field_name}", None, "must be SgxAttributes")


def _encode(obj: object, layout: _Layout) -> bytes:
    out = bytearray()
    for field_name, size, kind in layout:
        value = getattr(obj, field_name)
        if kind == "b":
            out += value
        elif kind == "u":
            out += value.to_bytes(size, "little")
        else:
            out += value.to_bytes()
    return bytes(out)


def decode_layout(reader: QuoteReader, layout: _Layout, prefix: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field_name, size, kind in layout:
        field = f"{prefix}.{field_name}"
        if kind == "b":
            values[field_name] = reader.take(size, field)
        elif kind == "u":
            values[field_name] = reader.uint(size, field)
        else:
            flags = reader.uint(8, field + ".flags")
            values[field_name] = SgxAttributes(flags=flags, xfrm=reader.uint(8, field + ".xfrm"))
    return values


@dataclass(frozen=True, slots=True, kw_only=True)
class SgxAttributes:
    """SGX enclave attributes: ``flags`` (INIT 0x1, DEBUG 0x2, MODE64BIT 0x4, ...) and ``xfrm``."""

    flags: int = 0
    xfrm: int = 0

    def __post_init__(self) -> None:
        for name in ("flags", "xfrm"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << 64:
                raise QuoteFormatError(f"SgxAttributes.{name}", None, f"must be an unsigned 64-bit int, got {value!r}")

    def to_bytes(self) -> bytes:
        return self.flags.to_bytes(8, "little") + self.xfrm.to_bytes(8, "little")


_HEADER_LAYOUT: _Layout = (
    ("version", 2, "u"),
    ("att_key_type", 2, "u"),
    ("tee_type", 4, "u"),
    ("qe_svn", 2, "u"),
    ("pce_svn", 2, "u"),
    ("qe_vendor_id", 16, "b"),
    ("user_data", 20, "b"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteHeader:
    """The 48-byte quote header; defaults describe an Intel-QE SGX ECDSA-P256 quote v3."""

    version: int = 3
    att_key_type: int = ATT_KEY_TYPE_ECDSA_P256
    tee_type: int = TEE_TYPE_SGX
    qe_svn: int = 0
    pce_svn: int = 0
    qe_vendor_id: bytes = INTEL_QE_VENDOR_ID
    user_data: bytes = bytes(20)

    def __post_init__(self) -> None:
        _check_values(self, _HEADER_LAYOUT)

    def to_bytes(self) -> bytes:
        return _encode(self, _HEADER_LAYOUT)

    @classmethod
    def read_from(cls, reader: QuoteReader, prefix: str) -> QuoteHeader:
        return cls(**decode_layout(reader, _HEADER_LAYOUT, prefix))


_SGX_REPORT_LAYOUT: _Layout = (
    ("cpu_svn", 16, "b"),
    ("misc_select", 4, "u"),
    ("cet_attributes", 1, "u"),
    ("reserved1", 11, "b"),
    ("isv_ext_prod_id", 16, "b"),
    ("attributes", 16, "a"),
    ("mr_enclave", 32, "b"),
    ("reserved2", 32, "b"),
    ("mr_signer", 32, "b"),
    ("reserved3", 32, "b"),
    ("config_id", 64, "b"),
    ("isv_prod_id", 2, "u"),
    ("isv_svn", 2, "u"),
    ("config_svn", 2, "u"),
    ("reserved4", 42, "b"),
    ("isv_family_id", 16, "b"),
    ("report_data", 64, "b"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SgxReportBody:
    """An SGX enclave report body (384 bytes): the ISV enclave's or the QE's identity."""

    cpu_svn: bytes = bytes(16)
    misc_select: int = 0
    cet_attributes: int = 0
    reserved1: bytes = bytes(11)
    isv_ext_prod_id: bytes = bytes(16)
    attributes: SgxAttributes = SgxAttributes()
    mr_enclave: bytes = bytes(32)
    reserved2: bytes = bytes(32)
    mr_signer: bytes = bytes(32)
    reserved3: bytes = bytes(32)
    config_id: bytes = bytes(64)
    isv_prod_id: int = 0
    isv_svn: int = 0
    config_svn: int = 0
    reserved4: bytes = bytes(42)
    isv_family_id: bytes = bytes(16)
    report_data: bytes = bytes(64)

    def __post_init__(self) -> None:
        _check_values(self, _SGX_REPORT_LAYOUT)

    @property
    def is_debug(self) -> bool:
        """True when the DEBUG attribute is set: the host can read the enclave's memory."""
        return bool(self.attributes.flags & _SGX_FLAG_DEBUG)

    def to_bytes(self) -> bytes:
        return _encode(self, _SGX_REPORT_LAYOUT)

    @classmethod
    def from_bytes(cls, data: bytes) -> SgxReportBody:
        """Parse exactly 384 bytes (e.g. a local report body).

        Raises:
            QuoteFormatError: wrong length.
        """
        reader = QuoteReader(bytes(data))
        body = cls.read_from(reader, "report")
        reader.expect_end("report")
        return body

    @classmethod
    def read_from(cls, reader: QuoteReader, prefix: str) -> SgxReportBody:
        return cls(**decode_layout(reader, _SGX_REPORT_LAYOUT, prefix))


_TD_REPORT_LAYOUT: _Layout = (
    ("tee_tcb_svn", 16, "b"),
    ("mr_seam", 48, "b"),
    ("mr_signer_seam", 48, "b"),
    ("seam_attributes", 8, "b"),
    ("td_attributes", 8, "b"),
    ("xfam", 8, "b"),
    ("mr_td", 48, "b"),
    ("mr_config_id", 48, "b"),
    ("mr_owner", 48, "b"),
    ("mr_owner_config", 48, "b"),
    ("rtmr0", 48, "b"),
    ("rtmr1", 48, "b"),
    ("rtmr2", 48, "b"),
    ("rtmr3", 48, "b"),
    ("report_data", 64, "b"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TdReportBody:
    """A TDX TD report 1.0 body (584 bytes); attribute fields stay raw 8-byte strings."""

    tee_tcb_svn: bytes = bytes(16)
    mr_seam: bytes = bytes(48)
    mr_signer_seam: bytes = bytes(48)
    seam_attributes: bytes = bytes(8)
    td_attributes: bytes = bytes(8)
    xfam: bytes = bytes(8)
    mr_td: bytes = bytes(48)
    mr_config_id: bytes = bytes(48)
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)
    rtmr0: bytes = bytes(48)
    rtmr1: bytes = bytes(48)
    rtmr2: bytes = bytes(48)
    rtmr3: bytes = bytes(48)
    report_data: bytes = bytes(64)

    def __post_init__(self) -> None:
        _check_values(self, _TD_REPORT_LAYOUT)

    @property
    def is_debug(self) -> bool:
        """True when TD_ATTRIBUTES.DEBUG (byte 0, bit 0) is set."""
        return bool(self.td_attributes[0] & 0x01)

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    def to_bytes(self) -> bytes:
        return _encode(self, _TD_REPORT_LAYOUT)

    @classmethod
    def read_from(cls, reader: QuoteReader, prefix: str) -> TdReportBody:
        return cls(**decode_layout(reader, _TD_REPORT_LAYOUT, prefix))
