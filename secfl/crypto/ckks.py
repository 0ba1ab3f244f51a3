"""CKKS (Cheon-Kim-Kim-Song 2017) through TenSEAL's SEAL bindings: presets, keys, packing.

The only module that imports ``tenseal``. Everything ``secfl.he`` does with ciphertexts goes
through the thin typed wrappers here:

* :class:`CkksPreset` — named parameter sets, each checked at construction for 128-bit
  security (the HomomorphicEncryption.org standard's bound on log2 Q for the ring degree,
  ternary secret, classical attacker) and for the depth it promises.
* :class:`SecretContext` — the decryptor's keys (secret key, public key, and for the ``trust``
  preset the relinearisation and Galois keys). It serialises only its *public* parts.
* :class:`PublicContext` — parameters plus public key (clients), plus evaluation keys
  (server). It has no secret key and no way to decrypt.

Packing: the flattened float vector fills complete ciphertexts, two reals per complex slot
(``x[2j] + i*x[2j+1]``), so one ciphertext carries ``N`` parameters; the last ciphertext is
zero-padded. Any model size works; there are no per-layer ciphertexts.

Wire format and weights: ciphertexts travel as SFCK v1 (:mod:`secfl.crypto.ckks_wire`), their
raw RNS residues. The server's weighted sum with *integer* weights (signed sample counts) is
exact modular arithmetic on those residues in NumPy, without SEAL; it equals SEAL's
``multiply_plain`` at scale 1 plus ``add`` residue for residue (no level consumed, the
aggregate stays at scale ``2**scale_bits``). SEAL ciphertexts are rebuilt from residues (SEAL's
uncompressed serialisation, in memory) only to decrypt or evaluate.

Randomness: SEAL draws key-generation and encryption randomness from its own PRNG factory.
By default (``seed=None``) it is SEAL's Blake2xb seeded from the OS (``std::random_device``);
with a 64-byte ``seed`` (seeded simulations only) it is a Blake2xb stream of that seed, so
keys and ciphertexts are bit-reproducible.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import hashlib
import itertools
import math
import os
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as seal

from secfl.crypto.ckks_wire import CiphertextFormat
from secfl.errors import CkksError, CkksParameterError
from secfl.wire import frame_parts, unframe_parts

#: HomomorphicEncryption.org security standard (Albrecht et al. 2018, Table 1, ternary
#: secret, classical, 128 bits): the largest total coefficient-modulus bits per ring degree.
HE_STANDARD_128_MAX_LOGQ: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}
#: SEAL's error standard deviation (``util::global_variables::noise_standard_deviation``).
ERROR_STDDEV = 3.2
#: Tail factor of the high-probability error bound: a Gaussian exceeds 12 sigma with
#: probability below 2^-105.
TAIL_SIGMAS = 12.0


@dataclass(frozen=True)
class CkksPreset:
    """A named CKKS parameter set.

    ``coeff_modulus_bits`` lists the primes' bit sizes; the last one is SEAL's special
    (key-switching) prime, the others form the data modulus a fresh ciphertext lives in.
    ``depth`` is the number of rescalings the preset promises (0: add and integer-scale only;
    1: one ciphertext-plaintext or ciphertext-ciphertext product, then rotations).
    ``precision`` is the bound on the flooded aggregate's error the preset is stated for, as a
    fraction of the per-coordinate range C (checked by :func:`flooding_plan`).
    """

    name: str
    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int
    depth: int
    galois_keys: bool
    precision: float
    summary: str = ""
    #: Whether products are rescaled (``True``: every rescaling prime >= the scale). The
    #: ``trust`` preset does not rescale: a product lives at scale 2^(2 scale_bits), which
    #: keeps the fresh error relative to the message, so flooding stays small (docs/ckks.md).
    rescale: bool = True
    data_bits: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_bits", sum(self.coeff_modulus_bits[:-1]))
        check_preset(self)

    @property
    def params_per_ciphertext(self) -> int:
        return self.poly_modulus_degree  # N/2 complex slots, two reals each

    def security_argument(self) -> str:
        total = sum(self.coeff_modulus_bits)
        limit = HE_STANDARD_128_MAX_LOGQ[self.poly_modulus_degree]
        return (
            f"ring degree N={self.poly_modulus_degree}, ternary secret, error stddev "
            f"{ERROR_STDDEV}; total coefficient modulus {total} bits "
            f"({'+'.join(map(str, self.coeff_modulus_bits))}) <= {limit} bits, the "
            "HomomorphicEncryption.org standard's 128-bit classical bound for this N "
            "(Albrecht et al. 2018, Table 1); SEAL additionally enforces the same table "
            "(sec_level_type.tc128) when the context is built"
        )


def check_preset(preset: CkksPreset) -> None:
    """Raise :class:`CkksParameterError` naming what is unsafe or insufficient, and why."""
    n = preset.poly_modulus_degree
    bits = preset.coeff_modulus_bits
    if n not in HE_STANDARD_128_MAX_LOGQ:
        raise CkksParameterError(
            f"preset {preset.name!r}: poly_modulus_degree {n} is not one of "
            f"{sorted(HE_STANDARD_128_MAX_LOGQ)} (powers of two covered by the HE standard)"
        )
    if len(bits) < 2:
        raise CkksParameterError(
            f"preset {preset.name!r}: coeff_modulus_bits {bits} needs at least two primes "
            "(data primes, then SEAL's special key-switching prime)"
        )
    for b in bits:
        if not 16 <= b <= 60:
            raise CkksParameterError(
                f"preset {preset.name!r}: prime of {b} bits; SEAL primes must have 16..60 bits"
            )
    total = sum(bits)
    limit = HE_STANDARD_128_MAX_LOGQ[n]
    if total > limit:
        raise CkksParameterError(
            f"preset {preset.name!r}: total coefficient modulus {total} bits exceeds {limit} "
            f"bits, the 128-bit security bound for N={n} (HE standard); use fewer or "
            "smaller primes or a larger N"
        )
    data_primes = len(bits) - 1
    if preset.depth < 0 or data_primes < preset.depth + 1:
        raise CkksParameterError(
            f"preset {preset.name!r}: depth {preset.depth} needs at least {preset.depth + 1} "
            f"data primes, got {data_primes}"
        )
    if preset.depth >= 1 and not preset.rescale:
        product_bits = (preset.depth + 1) * preset.scale_bits
        if product_bits + 8 > sum(bits[:-1]):
            raise CkksParameterError(
                f"preset {preset.name!r}: an unrescaled product at scale 2^{product_bits} "
                f"leaves fewer than 8 bits of headroom in the {sum(bits[:-1])}-bit data modulus"
            )
        if bits[-1] < max(bits[:-1]):
            raise CkksParameterError(
                f"preset {preset.name!r}: the special prime ({bits[-1]} bits) must be at "
                "least as large as every data prime for key switching to stay precise"
            )
        return
    if preset.depth >= 1:
        for b in bits[1:-1]:
            if b < preset.scale_bits:
                raise CkksParameterError(
                    f"preset {preset.name!r}: rescaling prime of {b} bits is smaller than "
                    f"the scale 2^{preset.scale_bits}; a product would lose its precision"
                )
        if bits[-1] < max(bits[:-1]):
            raise CkksParameterError(
                f"preset {preset.name!r}: the special prime ({bits[-1]} bits) must be at "
                "least as large as every data prime for key switching to stay precise"
            )
    # the modulus a result is decrypted in: the data primes left after ``depth`` rescalings
    data_bits = sum(bits[: len(bits) - 1 - preset.depth])
    if preset.scale_bits + 8 > data_bits:
        raise CkksParameterError(
            f"preset {preset.name!r}: scale 2^{preset.scale_bits} leaves fewer than 8 bits "
            f"of headroom in the {data_bits}-bit modulus the result is decrypted in"
        )
    if not 0 < preset.precision < 1:
        raise CkksParameterError(
            f"preset {preset.name!r}: precision must be in (0, 1), got {preset.precision}"
        )


#: Add-only aggregation: three 31-bit data primes (93 bits), special prime of 16 bits (never
#: used: no key switching), N=4096 -> 109 bits, exactly the 128-bit bound. Primes below 2^32
#: make every residue one aligned uint32 word on the wire (``ckks_wire``), which the server
#: sums in place with NumPy, exactly, without SEAL (the same 93 bits as 60+33 would give).
AGGREGATION = CkksPreset(
    name="aggregation",
    poly_modulus_degree=4096,
    coeff_modulus_bits=(31, 31, 31, 16),
    scale_bits=74,
    depth=0,
    galois_keys=False,
    precision=1e-5,
    summary="add-only weighted sums; public key only, no evaluation keys",
)
#: Trust scalars and sums from the same ciphertexts: N=16384, three 60-bit data primes
#: (180 bits) and a 60-bit special prime (240 <= 438). Fresh scale 2^74 as for
#: ``aggregation``, so a flooded sum meets 1e-4 x C; one ciphertext product (or a product with
#: a plaintext encoded at 2^74) is *not* rescaled: it stays at scale 2^148, so its error is
#: the fresh error times the other factor (no rescaling error at a 2^40 scale to flood), and
#: the remaining 2^31 of headroom holds inner products up to 2^27 (checked per request).
#: Version 2 of this preset (v1: N=8192, 60+40+40, scale 2^40 could not be flooded usefully:
#: its flooded sum bound was 2e5 x C).
TRUST = CkksPreset(
    name="trust",
    poly_modulus_degree=16384,
    coeff_modulus_bits=(60, 60, 60, 60),
    scale_bits=74,
    depth=1,
    galois_keys=True,
    precision=1e-4,
    summary="sums plus trust scalars: inner products with a plaintext reference or another "
    "ciphertext and squared norms (relinearisation + Galois keys)",
    rescale=False,
)
PRESETS: dict[str, CkksPreset] = {p.name: p for p in (AGGREGATION, TRUST)}


def get_preset(name: str) -> CkksPreset:
    preset = PRESETS.get(name)
    if preset is None:
        raise CkksParameterError(
            f"aggregation.ckks.preset {name!r} is unknown; known presets: {sorted(PRESETS)}"
        )
    return preset


# ---------------------------------------------------------------------------- flooding


@dataclass(frozen=True)
class FloodingPlan:
    """The Gaussian noise every release carries, and the error bound it implies.

    LMSS 2022 (Li, Micciancio, Schultz, Sorrell, CRYPTO 2022, Thm. on the Gaussian
    mechanism; the parameterisation OpenFHE adopted for NOISE_FLOODING_DECRYPT): adding
    Gaussian noise of standard deviation ``sqrt(24 * n * q) * 2^(s/2) * t`` to decryption
    results whose error is bounded by ``t`` gives s-bit statistical IND-CPA^D security for q
    decryption queries of n released values each. Without it, a decrypted CKKS value minus the
    known message is a linear function of the secret key (Li-Micciancio, Eurocrypt 2021).
    """

    statistical_bits: int
    query_budget: int
    #: High-probability bound on the CKKS error of one fresh ciphertext's released value.
    fresh_error: float
    #: Noise standard deviation on the *mean* (noise on the weighted sum / total weight).
    mean_sigma: float
    #: Stated bound on |released mean - true weighted mean| per coordinate (7 sigma + t).
    mean_bound: float
    released_values_per_query: int

    def sum_sigma(self, total_weight: int) -> float:
        return self.mean_sigma * total_weight


def fresh_error_bound(preset: CkksPreset) -> float:
    """Bound on the error of each released real (slot real or imaginary part), fresh
    public-key encryption at scale 2^scale_bits, in message units.

    Decryption leaves e = -e_pk*u + e1 + e2*s (SEAL); with ternary u, s (variance 2/3) each
    coefficient has variance sigma^2 (4N/3 + 1); a slot sums N coefficients, so each real
    part has standard deviation sigma*sqrt(N (4N/3 + 1) / 2); we take TAIL_SIGMAS of it.
    """
    n = preset.poly_modulus_degree
    slot_sd = ERROR_STDDEV * math.sqrt(n * (4.0 * n / 3.0 + 1.0) / 2.0)
    return TAIL_SIGMAS * slot_sd / 2.0**preset.scale_bits


def flooding_plan(
    preset: CkksPreset, *, statistical_bits: int, query_budget: int, clip_range: float
) -> FloodingPlan:
    """The noise for ``preset`` at the configured level, checked against its precision.

    Raises :class:`CkksParameterError` if the stated bound exceeds ``precision * C``.
    """
    if statistical_bits < 40:
        raise CkksParameterError(f"flooding.statistical_bits must be >= 40, got {statistical_bits}")
    if query_budget < 1:
        raise CkksParameterError(f"flooding.query_budget must be >= 1, got {query_budget}")
    released = preset.poly_modulus_degree
    t = fresh_error_bound(preset)
    sigma = math.sqrt(24.0 * released * query_budget) * 2.0 ** (statistical_bits / 2.0) * t
    bound = 7.0 * sigma + t
    if bound > preset.precision * clip_range:
        raise CkksParameterError(
            f"preset {preset.name!r} cannot meet its precision {preset.precision} x C with "
            f"C={clip_range}, {statistical_bits}-bit flooding and a query budget of "
            f"{query_budget}: the flooded error bound is {bound:.3g} > "
            f"{preset.precision * clip_range:.3g}; "
            "lower flooding.query_budget (keys rotate sooner), raise clip_range, or use a "
            "preset with a larger scale"
        )
    return FloodingPlan(
        statistical_bits=statistical_bits,
        query_budget=query_budget,
        fresh_error=t,
        mean_sigma=sigma,
        mean_bound=bound,
        released_values_per_query=released,
    )


def scalar_flooding_sigma(
    preset: CkksPreset, *, statistical_bits: int, query_budget: int, sensitivity: float
) -> float:
    """Noise for one released scalar whose CKKS-error contribution is at most
    ``sensitivity`` x the per-value fresh error bound (LMSS 2022 with n = 1)."""
    t = fresh_error_bound(preset) * sensitivity
    return math.sqrt(24.0 * query_budget) * 2.0 ** (statistical_bits / 2.0) * t


# ---------------------------------------------------------------------------- contexts


def _scratch_root() -> str:
    """A private (mode 0700) directory for SEAL's file-based (de)serialisation, in RAM
    (``/dev/shm``) where available; the TenSEAL bindings only save and load via paths."""
    ram = "/dev/shm"  # noqa: S108  (a fresh mkdtemp below, never a fixed name)
    base = ram if os.path.isdir(ram) and os.access(ram, os.W_OK) else None
    return tempfile.mkdtemp(prefix="secfl-ckks-", dir=base)


_local = threading.local()


def _scratch() -> str:
    if getattr(_local, "pid", None) != os.getpid():  # new thread, or a forked child
        _local.dir = _scratch_root()
        _local.pid = os.getpid()
        atexit.register(shutil.rmtree, _local.dir, True)
    return os.path.join(_local.dir, "object.bin")


def _save(obj: Any) -> bytes:
    path = _scratch()
    obj.save(path)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


_SEAL_MAGIC = 0xA15E
# SEAL 4 ``SEALHeader``: magic, header_size, version_major, version_minor, compr_mode,
# reserved, size (of the whole object, header included).
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_COMPR_NONE, _COMPR_ZSTD = 0, 2


def _zstd() -> Any:
    """libzstd's one-shot decompressor: the copy SEAL itself links (exported by TenSEAL's
    ``_sealapi_cpp`` extension), else the system library."""
    lib = getattr(_zstd, "lib", None)
    if lib is None:
        candidates = [getattr(sys.modules.get("_sealapi_cpp"), "__file__", None)]
        candidates.append(ctypes.util.find_library("zstd"))
        for path in candidates:
            if not path:
                continue
            try:
                loaded = ctypes.CDLL(path)
                decompress = loaded.ZSTD_decompress
                content_size = loaded.ZSTD_getFrameContentSize
            except (OSError, AttributeError):
                continue
            decompress.restype = ctypes.c_size_t
            decompress.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_char_p,
                ctypes.c_size_t,
            ]
            content_size.restype = ctypes.c_ulonglong
            content_size.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
            lib = (decompress, content_size)
            break
        if lib is None:
            raise CkksError("no zstd library found to read SEAL's compressed serialisation")
        _zstd.lib = lib  # type: ignore[attr-defined]
    return lib


def _seal_body(data: bytes, what: str) -> bytes:
    """The uncompressed members of one SEAL serialisation (the bytes after its header)."""
    _check_header(data, what)
    compr_mode = data[5]
    body = data[_SEAL_HEADER.size :]
    if compr_mode == _COMPR_NONE:
        return body
    if compr_mode != _COMPR_ZSTD:
        raise CkksError(f"cannot read {what}: SEAL compression mode {compr_mode} (expected zstd)")
    decompress, content_size = _zstd()
    size = int(content_size(body, len(body)))
    if size >= 2**63:  # ZSTD_CONTENTSIZE_UNKNOWN / _ERROR
        raise CkksError(f"cannot read {what}: zstd frame without a content size")
    out = ctypes.create_string_buffer(size)
    got = int(decompress(out, size, body, len(body)))
    if got != size:
        raise CkksError(f"cannot read {what}: zstd decompression failed ({got} of {size} bytes)")
    return out.raw


def _check_header(data: bytes, what: str) -> None:
    # SEAL ignores bytes after the size its header states; we refuse them (one object per blob).
    if len(data) < _SEAL_HEADER.size:
        raise CkksError(f"cannot load {what}: {len(data)} bytes is shorter than SEAL's header")
    magic, _, _, _, _, _, size = _SEAL_HEADER.unpack_from(data, 0)
    if magic != _SEAL_MAGIC or size != len(data):
        raise CkksError(
            f"cannot load {what}: not one SEAL object (magic {magic:#x}, header size {size}, "
            f"{len(data)} bytes given)"
        )


def _load_into(obj: Any, context: Any, data: bytes, what: str) -> None:
    _check_header(data, what)
    path = _scratch()
    with open(path, "wb") as f:
        f.write(data)
    try:
        if context is None:
            obj.load(path)
        else:
            obj.load(context, path)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CkksError(
            f"cannot load {what}: {exc} (corrupted bytes, or made under different CKKS "
            "parameters / keys)"
        ) from None
    finally:
        os.unlink(path)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _as_tenseal_vector(data: bytes) -> bytes:
    """Wrap one SEAL ciphertext in TenSEAL's ``CKKSVectorProto`` (field 1: packed size,
    field 2: the SEAL ciphertext, field 3: scale) so TenSEAL loads it from memory; SEAL's
    own Python bindings only load from files, which costs a write and a read per ciphertext."""
    size = _varint(1)
    return (
        b"\x0a"
        + _varint(len(size))
        + size
        + b"\x12"
        + _varint(len(data))
        + data
        + b"\x19"
        + struct.pack("<d", 1.0)
    )


_tenseal_loaders: dict[str, Any] = {}


def _tenseal_loader(preset: CkksPreset) -> Any:
    """A TenSEAL context with the preset's parameters, used only to deserialise; its own
    (unrelated) secret key is dropped at once."""
    key = f"{preset.name}/{os.getpid()}"  # TenSEAL's thread pool does not survive fork()
    loader = _tenseal_loaders.get(key)
    if loader is None:
        loader = ts.context(
            ts.SCHEME_TYPE.CKKS,
            preset.poly_modulus_degree,
            coeff_mod_bit_sizes=list(preset.coeff_modulus_bits),
            n_threads=1,
        )
        loader.make_context_public()
        # Integer weights are encoded at scale 1 and nothing is ever rescaled or switched
        # implicitly: a mismatch is an error, never a silent change of level.
        loader.global_scale = 1.0
        loader.auto_rescale = False
        loader.auto_relin = False
        loader.auto_mod_switch = False
        _tenseal_loaders[key] = loader
    return loader


def aggregate_digest(blobs: Sequence[bytes]) -> bytes:
    """Digest of a list of SFCK v1 ciphertexts: SHA-256 over their SHA-256s in order. The
    encoding is canonical (reduced residues, fixed layout), so equal sums give equal digests."""
    inner = b"".join(hashlib.sha256(b).digest() for b in blobs)
    return hashlib.sha256(b"secfl/ckks/aggregate/v2" + inner).digest()


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data):
            raise CkksError("truncated varint in a TenSEAL vector")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, offset


def _proto_field(data: bytes, wanted: int) -> bytes:
    """Length-delimited field ``wanted`` of a TenSEAL protobuf message."""
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, offset = _read_varint(data, offset)
            if field_number == wanted:
                return data[offset : offset + length]
            offset += length
        elif wire_type == 1:
            offset += 8
        elif wire_type == 5:
            offset += 4
        elif wire_type == 0:
            _, offset = _read_varint(data, offset)
        else:
            break
    raise CkksError(f"TenSEAL vector has no field {wanted}")


def _parameters(preset: CkksPreset, seed: bytes | None) -> Any:
    params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    params.set_poly_modulus_degree(preset.poly_modulus_degree)
    params.set_coeff_modulus(
        seal.CoeffModulus.Create(preset.poly_modulus_degree, list(preset.coeff_modulus_bits))
    )
    if seed is not None:
        if len(seed) != 64:
            raise CkksParameterError(f"a SEAL PRNG seed has 64 bytes, got {len(seed)}")
        params.set_random_generator(seal.Blake2xbPRNGFactory(list(struct.unpack("<8Q", seed))))
    return params


def _seal_context(params: Any, preset: CkksPreset, *, chain: bool = True) -> Any:
    context = seal.SEALContext(params, chain, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise CkksParameterError(
            f"preset {preset.name!r} rejected by SEAL: {context.parameters_error_message()}"
        )
    return context


def _frame(parts: Sequence[bytes]) -> bytes:
    return frame_parts(parts)


def _unframe(data: bytes, what: str) -> list[bytes]:
    return unframe_parts(data, what, error=CkksError)


_CONTEXT_MAGIC = b"SFLCKKS1"


class PublicContext:
    """Parameters plus public key (and, for the server, evaluation keys). No secret key."""

    def __init__(self, preset: CkksPreset, data: bytes) -> None:
        if not data.startswith(_CONTEXT_MAGIC):
            raise CkksError("public context: bad magic (not a secfl CKKS context)")
        parts = _unframe(data[len(_CONTEXT_MAGIC) :], "public context")
        if len(parts) not in (3, 5):
            raise CkksError(f"public context: expected 3 or 5 parts, got {len(parts)}")
        name = parts[0].decode("utf-8", "replace")
        if name != preset.name:
            raise CkksError(f"public context is for preset {name!r}, expected {preset.name!r}")
        self.preset = preset
        self.data = data
        self.digest = hashlib.sha256(data).digest()
        params = _parameters(preset, None)
        loaded = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        _load_into(loaded, None, parts[1], "CKKS parameters")
        if loaded.coeff_modulus() and [m.value() for m in loaded.coeff_modulus()] != [
            m.value() for m in params.coeff_modulus()
        ]:
            raise CkksError(f"public context parameters do not match preset {preset.name!r}")
        self.context = _seal_context(params, preset)
        self.public_key = seal.PublicKey()
        _load_into(self.public_key, self.context, parts[2], "public key")
        self.relin_keys: Any = None
        self.galois_keys: Any = None
        if len(parts) == 5:
            self.relin_keys = seal.RelinKeys()
            _load_into(self.relin_keys, self.context, parts[3], "relinearisation keys")
            self.galois_keys = seal.GaloisKeys()
            _load_into(self.galois_keys, self.context, parts[4], "Galois keys")
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self._encryptor = seal.Encryptor(self.context, self.public_key)
        self.scale = 2.0**preset.scale_bits
        primes = tuple(
            int(m.value()) for m in self.context.first_context_data().parms().coeff_modulus()
        )
        self.data_modulus = math.prod(primes)
        #: The wire format of this context's fresh ciphertexts (``secfl.crypto.ckks_wire``).
        self.format = CiphertextFormat(preset.poly_modulus_degree, primes, preset.scale_bits)
        self._seal_layout: tuple[bytes, bytes] | None = None

    @property
    def has_evaluation_keys(self) -> bool:
        return self.galois_keys is not None

    def max_total_weight(self, clip_range: float) -> int:
        """Largest sum of integer weights whose weighted sum cannot wrap modulo Q.

        A packed coefficient is at most 2*sqrt(2)*C in message units; the weighted sum of
        weight W must stay below Q/2 with a factor-2 margin for the error.
        """
        return int(self.data_modulus // int(4 * 2 * math.sqrt(2) * clip_range * self.scale) + 1)

    # -- packing and encryption ---------------------------------------------------------

    def ciphertext_count(self, size: int) -> int:
        return max(1, -(-size // self.preset.params_per_ciphertext))

    def encrypt_chunk(self, values: np.ndarray, *, seed: bytes | None = None) -> bytes:
        """Encrypt up to N reals (two per complex slot) and serialise (zstd, SEAL format).

        With a 64-byte ``seed`` the encryption randomness comes from a SEAL context whose
        PRNG factory is seeded with it. SEAL's seeded factory hands the *same* seed to every
        PRNG it creates, so a seeded context must never encrypt twice: we build one per
        ciphertext (seeded simulations only; costs about one encryption's time).
        """
        n = self.preset.params_per_ciphertext
        if values.size > n:
            raise CkksError(f"a ciphertext holds {n} parameters, got {values.size}")
        padded = np.zeros(n, dtype=np.float64)
        padded[: values.size] = values
        slots = (padded[0::2] + 1j * padded[1::2]).tolist()
        plain = seal.Plaintext()
        self.encoder.encode(slots, self.scale, plain)
        ct = seal.Ciphertext()
        if seed is None:
            self._encryptor.encrypt(plain, ct)
        else:
            once = _seal_context(_parameters(self.preset, seed), self.preset, chain=False)
            seal.Encryptor(once, self.public_key).encrypt(plain, ct)
        return self.to_wire(ct)

    # -- SFCK v1 <-> SEAL ---------------------------------------------------------------

    def _layout(self) -> tuple[bytes, bytes]:
        """SEAL's serialisation of a fresh ciphertext of this context, split around its
        residues: (outer SEAL header with size and compression to fill in, the members before
        the coefficient data). Taken from SEAL itself once per context (one encryption of
        zero), so the bytes follow whatever SEAL 4.x version TenSEAL links."""
        if self._seal_layout is None:
            plain = seal.Plaintext()
            self.encoder.encode([0j], self.scale, plain)
            ct = seal.Ciphertext()
            self._encryptor.encrypt(plain, ct)
            saved = _save(ct)
            body = _seal_body(saved, "ciphertext")
            data_bytes = (
                8 * self.format.polys * len(self.format.primes) * self.format.poly_modulus_degree
            )
            prefix = body[: len(body) - data_bytes]
            # the coefficient data is SEAL's DynArray: its own header, a u64 count, the words
            (count,) = struct.unpack_from("<Q", prefix, len(prefix) - 8)
            if count * 8 != data_bytes or len(prefix) < 8 + _SEAL_HEADER.size:
                raise CkksError(
                    "SEAL's ciphertext serialisation has an unexpected layout "
                    f"({count} coefficient words, expected {data_bytes // 8})"
                )
            self._seal_layout = (saved[:5], prefix)
        return self._seal_layout

    def to_wire(self, ct: Any) -> bytes:
        """A fresh SEAL ciphertext of this context as an SFCK v1 blob (its RNS residues)."""
        return self.seal_bytes_to_wire(_save(ct))

    def seal_bytes_to_wire(self, data: bytes) -> bytes:
        """SEAL's serialisation of a top-level two-component ciphertext as an SFCK v1 blob."""
        prefix = self._layout()[1]
        body = _seal_body(data, "ciphertext")
        if body[: len(prefix)] != prefix or len(body) != len(prefix) + 8 * (
            self.format.segments * self.format.poly_modulus_degree
        ):
            raise CkksError(
                "ciphertext is not a fresh two-component ciphertext at this context's top "
                "level and scale; only those have an SFCK encoding"
            )
        residues = np.frombuffer(body, dtype="<u8", offset=len(prefix)).reshape(
            self.format.polys, len(self.format.primes), self.format.poly_modulus_degree
        )
        return self.format.encode(residues)

    def to_seal_bytes(self, data: bytes) -> bytes:
        """An SFCK v1 blob as SEAL's (uncompressed) ciphertext serialisation, checked."""
        residues = self.format.decode(data)
        start, prefix = self._layout()
        size = _SEAL_HEADER.size + len(prefix) + residues.nbytes
        header = start + bytes([_COMPR_NONE, 0, 0]) + struct.pack("<Q", size)
        return header + prefix + residues.astype("<u8", copy=False).tobytes()

    def count_framed(self, framed: bytes, what: str = "ciphertexts") -> int:
        """How many SFCK v1 ciphertexts a framed list holds (lengths and headers checked)."""
        return self.format.count_framed(framed, what)

    def _load_vector(self, data: bytes) -> tuple[Any, Any]:
        """Deserialise one fresh ciphertext (SFCK v1) in memory as a TenSEAL vector, checked:
        a two-component ciphertext at this context's top level and scale."""
        seal_bytes = self.to_seal_bytes(data)
        try:
            vector = ts.ckks_vector_from(
                _tenseal_loader(self.preset), _as_tenseal_vector(seal_bytes)
            )
            inner = vector.data.ciphertext()
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CkksError(
                f"cannot load ciphertext: {exc} (corrupted bytes, or made under different "
                "CKKS parameters / keys)"
            ) from None
        if (
            len(inner) != 1
            or inner[0].size() != 2
            or list(inner[0].parms_id()) != list(self.context.first_parms_id())
        ):
            raise CkksError(
                "ciphertext is not a fresh two-component ciphertext at this context's top "
                "level (wrong parameters, or a derived ciphertext)"
            )
        if abs(inner[0].scale - self.scale) > 1e-6 * self.scale:
            raise CkksError(
                f"ciphertext scale {inner[0].scale} differs from the preset's {self.scale}"
            )
        return vector, inner[0]

    def load_ciphertext(self, data: bytes) -> Any:
        """Deserialise and check one fresh ciphertext (a SEAL ``Ciphertext``)."""
        return self._load_vector(data)[1]

    def weighted_sum(
        self, columns: Sequence[Sequence[bytes]], weights: Sequence[int]
    ) -> list[bytes]:
        """``sum_i weights[i] * ct[i][k]`` for every ciphertext index k (SFCK v1 blobs);
        ``columns[i]`` are client i's ciphertexts in order. See :meth:`weighted_sum_framed`."""
        if not columns:
            raise CkksError("weighted_sum needs at least one contributor")
        count = len(columns[0])
        for i, column in enumerate(columns):
            if len(column) != count:
                raise CkksError(f"contributor {i} sent {len(column)} ciphertexts, expected {count}")
        framed = [b"".join(struct.pack(">I", len(b)) + b for b in column) for column in columns]
        return self.weighted_sum_framed(framed, weights)

    def weighted_sum_seal(
        self, columns: Sequence[Sequence[bytes]], weights: Sequence[int]
    ) -> list[bytes]:
        """Reference for tests: the same sum computed by SEAL through TenSEAL (each
        ciphertext loaded, ``mul_`` by its integer weight at scale 1, ``add_`` in place),
        returned as SFCK v1 blobs. :meth:`weighted_sum` must equal it byte for byte."""
        out: list[bytes] = []
        try:
            for k in range(len(columns[0])):
                acc = self._load_vector(columns[0][k])[0]
                acc.mul_(int(weights[0]))
                for i in range(1, len(columns)):
                    term = self._load_vector(columns[i][k])[0]
                    term.mul_(int(weights[i]))
                    acc.add_(term)
                out.append(self.seal_bytes_to_wire(_proto_field(acc.serialize(), 2)))
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CkksError(f"cannot sum ciphertexts: {exc}") from None
        return out

    def weighted_sum_framed(self, framed: Sequence[bytes], weights: Sequence[int]) -> list[bytes]:
        """The server's (and the decryptor's) aggregation, without SEAL: exact modular sums
        of the RNS residues (``CiphertextFormat.weighted_sum``), straight from each client's
        framed, signed ``ciphertexts`` bytes. Equals SEAL's ``multiply_plain`` by the integer
        weight at scale 1 followed by ``add``, residue for residue."""
        return self.format.weighted_sum(framed, list(weights))

    # -- trust-preset evaluation (server side) -------------------------------------------

    def rotate(self, data: bytes, steps: int) -> bytes:
        """Rotate a ciphertext's slots (needs Galois keys; used to test refusals)."""
        if self.galois_keys is None:
            raise CkksError(f"preset {self.preset.name!r} context has no Galois keys")
        ct = self.load_ciphertext(data)
        self.evaluator.rotate_vector_inplace(ct, steps, self.galois_keys)
        return self.to_wire(ct)  # same level and scale: still an SFCK v1 ciphertext

    def _require_evaluation(self) -> None:
        if self.galois_keys is None or self.relin_keys is None:
            raise CkksError(
                f"preset {self.preset.name!r} context has no evaluation keys; trust scalars "
                "need aggregation.ckks.preset 'trust' and the server's context"
            )

    def scalar_capacity(self) -> float:
        """Largest |scalar| an unrescaled product (scale 2^(2 scale_bits)) holds with a
        factor-16 margin below Q/2 (the fresh error and the key-switching error fit in it)."""
        return float(self.data_modulus) / 2.0 ** (2 * self.preset.scale_bits + 5)

    def check_scalar_range(self, *, size: int, clip_range: float, other_norm: float) -> None:
        """Refuse a scalar that could wrap modulo Q: ``sqrt(size) * clip_range * other_norm``
        bounds |<x, y>| for x clipped to [-C, C] and ||y|| <= other_norm."""
        bound = math.sqrt(size) * clip_range * other_norm
        if not bound <= self.scalar_capacity():
            raise CkksError(
                f"a trust scalar of {size} values (clip_range {clip_range}, other norm "
                f"{other_norm:.4g}) may reach {bound:.4g}, above the {self.scalar_capacity():.4g}"
                f" preset {self.preset.name!r} holds; lower aggregation.ckks.clip_range"
            )

    def _sum_slots(self, acc: Any) -> bytes:
        """Relinearise if needed, then rotate-and-sum: every slot holds the slot sum."""
        if acc.size() > 2:
            self.evaluator.relinearize_inplace(acc, self.relin_keys)
        step = 1
        while step < self.preset.poly_modulus_degree // 2:
            rotated = seal.Ciphertext()
            self.evaluator.rotate_vector(acc, step, self.galois_keys, rotated)
            self.evaluator.add_inplace(acc, rotated)
            step *= 2
        return _save(acc)

    def conjugates(self, data: Sequence[bytes]) -> list[Any]:
        """The complex conjugates of ciphertexts (one Galois key switch each); the server
        computes the trusted party's once per round and reuses them for every client."""
        self._require_evaluation()
        out = []
        for blob in data:
            conj = seal.Ciphertext()
            self.evaluator.complex_conjugate(self.load_ciphertext(blob), self.galois_keys, conj)
            out.append(conj)
        return out

    def inner_product_plain(self, data: Sequence[bytes], reference: np.ndarray) -> bytes:
        """Encrypted <x, reference> in every slot's real part (SEAL serialisation, scale
        2^(2 s)): sum_k z_k * conj(r_k) slot-wise, no rescale, then rotate-and-sum."""
        self._require_evaluation()
        n = self.preset.params_per_ciphertext
        acc: Any = None
        for k, blob in enumerate(data):
            ct = self.load_ciphertext(blob)
            part = np.zeros(n)
            chunk = np.asarray(reference[k * n : (k + 1) * n], dtype=np.float64)
            part[: chunk.size] = chunk
            # Re(z * conj(r)) = x_even r_even + x_odd r_odd: the real inner product.
            plain = seal.Plaintext()
            self.encoder.encode((part[0::2] - 1j * part[1::2]).tolist(), self.scale, plain)
            self.evaluator.multiply_plain_inplace(ct, plain)
            if acc is None:
                acc = ct
            else:
                self.evaluator.add_inplace(acc, ct)
        return self._sum_slots(acc)

    def inner_product(self, data: Sequence[bytes], other: Sequence[Any]) -> bytes:
        """Encrypted <x, y> (every slot's real part): ``other`` are y's conjugated ciphertexts
        (:meth:`conjugates`); slot-wise products (ciphertext x ciphertext), summed, one
        relinearisation, rotate-and-sum. No rescale (scale 2^(2 s))."""
        self._require_evaluation()
        if len(other) != len(data):
            raise CkksError(f"inner product of {len(data)} and {len(other)} ciphertexts")
        acc: Any = None
        for blob, conj in zip(data, other, strict=True):
            product = seal.Ciphertext()
            self.evaluator.multiply(self.load_ciphertext(blob), conj, product)
            if acc is None:
                acc = product
            else:
                self.evaluator.add_inplace(acc, product)
        return self._sum_slots(acc)

    def squared_norm(self, data: Sequence[bytes]) -> bytes:
        """Encrypted ||x||^2 = <x, x> (:meth:`inner_product` with its own conjugates)."""
        return self.inner_product(data, self.conjugates(data))

    def mask_plaintexts(self, mask: np.ndarray, scale_bits: int) -> list[MaskPlain]:
        """Encode a 0/1 coordinate mask for :meth:`masked_squared_norm` at scale
        2^``scale_bits``: per ciphertext k that the mask touches, alpha_j = (m_2j + m_2j+1)/2
        and beta_j = (m_2j - m_2j+1)/2 (beta omitted where 0), so that per slot
        alpha |z|^2 + Re(beta z^2) = m_2j x_2j^2 + m_2j+1 x_2j+1^2. ``weight`` is
        sum_j |alpha'_j| + |beta'_j| of the *decoded* plaintexts (the values actually
        multiplied in, encoding error included): |slot sum| <= 2 C^2 weight; ``peak`` is
        its largest slot term (the factor on the CKKS error of one packed pair), ``error``
        the largest |alpha' - alpha| + |beta' - beta| of a slot, so the encoded mask moves the
        scalar by at most ``error * ||x||^2``."""
        n = self.preset.params_per_ciphertext
        flat = np.asarray(mask, dtype=np.float64).ravel()
        out: list[MaskPlain] = []
        for k in range(self.ciphertext_count(flat.size)):
            part = np.zeros(n)
            chunk = flat[k * n : (k + 1) * n]
            part[: chunk.size] = chunk
            if not part.any():
                continue
            alpha = (part[0::2] + part[1::2]) / 2.0
            beta = (part[0::2] - part[1::2]) / 2.0
            plains: list[Any] = []
            per_slot = np.zeros(alpha.size)
            error = np.zeros(alpha.size)
            for values in (alpha, beta):
                if not values.any():
                    plains.append(None)
                    continue
                plain = seal.Plaintext()
                self.encoder.encode(values.tolist(), 2.0**scale_bits, plain)
                decoded = np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)
                per_slot += np.abs(decoded)
                error += np.abs(decoded - values)
                plains.append(plain)
            out.append(
                MaskPlain(
                    k,
                    plains[0],
                    plains[1],
                    weight=float(per_slot.sum()),
                    peak=float(per_slot.max()),
                    error=float(error.max()),
                )
            )
        return out

    def masked_capacity(self, scale_bits: int) -> float:
        """Largest |scalar| a product at scale 2^(2 scale_bits + ``scale_bits``) holds (the
        same factor-16 margin as :meth:`scalar_capacity`)."""
        return self.scalar_capacity() / 2.0**scale_bits

    def masked_squared_norm(self, data: Sequence[bytes], plains: Sequence[MaskPlain]) -> bytes:
        """Encrypted sum_i m_i x_i^2 (slot 0's real part): for each ciphertext the mask
        touches, (z conj(z)) x alpha + (z z) x beta, slot-wise, summed, one relinearisation,
        rotate-and-sum. No rescale: scale 2^(2 s + mask scale bits)."""
        self._require_evaluation()
        acc: Any = None
        for entry in plains:
            if not 0 <= entry.index < len(data):
                raise CkksError(f"mask ciphertext {entry.index} of {len(data)}")
            ct = self.load_ciphertext(data[entry.index])
            terms = []
            if entry.alpha is not None:
                conj = seal.Ciphertext()
                self.evaluator.complex_conjugate(ct, self.galois_keys, conj)
                product = seal.Ciphertext()
                self.evaluator.multiply(ct, conj, product)
                self.evaluator.multiply_plain_inplace(product, entry.alpha)
                terms.append(product)
            if entry.beta is not None:
                square = seal.Ciphertext()
                self.evaluator.square(ct, square)
                self.evaluator.multiply_plain_inplace(square, entry.beta)
                terms.append(square)
            for term in terms:
                if acc is None:
                    acc = term
                else:
                    self.evaluator.add_inplace(acc, term)
        if acc is None:
            raise CkksError("a masked squared norm needs a mask with at least one coordinate")
        return self._sum_slots(acc)


@dataclass(frozen=True)
class MaskPlain:
    """One ciphertext's encoded mask plaintexts (:meth:`PublicContext.mask_plaintexts`)."""

    index: int
    alpha: Any
    beta: Any
    weight: float
    peak: float
    error: float


def trust_galois_elements(preset: CkksPreset) -> list[int]:
    """SEAL Galois elements for left rotations by 1, 2, 4, ..., N/4 slots (3^step mod 2N)
    and the complex conjugation (2N - 1)."""
    m = 2 * preset.poly_modulus_degree
    steps = [1 << i for i in range(int(math.log2(preset.poly_modulus_degree // 2)))]
    return [pow(3, step, m) for step in steps] + [m - 1]


def scalar_digest(data: bytes) -> bytes:
    """Digest of an encrypted trust scalar (SEAL serialisation) the server computed; the
    decryptor compares it with its own recomputation's."""
    return hashlib.sha256(b"secfl/ckks/scalar/v1" + hashlib.sha256(data).digest()).digest()


class SecretContext:
    """The decryptor's key material. Only :meth:`public_bytes` leaves this object."""

    def __init__(self, preset: CkksPreset, *, seed: bytes | None = None) -> None:
        self.preset = preset
        params = _parameters(preset, None)
        self._params_bytes = _save(params)
        self.context = _seal_context(params, preset)
        # A seeded SEAL factory repeats its seed for every PRNG it creates, so each random
        # object gets its own seeded context: secret key, public key. Evaluation keys use
        # the OS-seeded default (they never influence a released value: the decryptor
        # recomputes every release from fresh client ciphertexts).
        if seed is None:
            keygen = seal.KeyGenerator(self.context)
            self._secret_key = keygen.secret_key()
            pk_keygen = keygen
        else:
            if len(seed) != 64:
                raise CkksParameterError(f"a key-generation seed has 64 bytes, got {len(seed)}")
            sk_ctx = _seal_context(
                _parameters(preset, hashlib.sha512(seed + b"sk").digest()), preset
            )
            self._secret_key = seal.KeyGenerator(sk_ctx).secret_key()
            pk_ctx = _seal_context(
                _parameters(preset, hashlib.sha512(seed + b"pk").digest()), preset
            )
            pk_keygen = seal.KeyGenerator(pk_ctx, self._secret_key)
            keygen = seal.KeyGenerator(self.context, self._secret_key)
        self._public_key = seal.PublicKey()
        pk_keygen.create_public_key(self._public_key)
        parts = [preset.name.encode(), self._params_bytes, _save(self._public_key)]
        client_parts = list(parts)
        if preset.galois_keys:
            # SEAL's "serializable" keys replace each uniform polynomial by its PRNG seed,
            # so the server context travels at about half the size; it expands on load.
            # Only the keys the trust scalars use: rotations by 2^i (rotate-and-sum) and the
            # complex conjugation (real inner products of packed pairs); half of SEAL's set.
            parts += [
                _save(keygen.create_relin_keys()),
                _save(keygen.create_galois_keys(trust_galois_elements(preset))),
            ]
        self._client_bytes = _CONTEXT_MAGIC + _frame(client_parts)
        self._server_bytes = _CONTEXT_MAGIC + _frame(parts)
        self._decryptor = seal.Decryptor(self.context, self._secret_key)
        self._encoder = seal.CKKSEncoder(self.context)
        self.public = PublicContext(preset, self._server_bytes)

    def client_context_bytes(self) -> bytes:
        """Parameters and public key: what a client needs to encrypt."""
        return self._client_bytes

    def server_context_bytes(self) -> bytes:
        """Client context plus relinearisation and Galois keys (trust preset only)."""
        return self._server_bytes

    def secret_key_bytes_for_tests(self) -> bytes:
        """The serialised secret key, so tests can prove no public output contains it."""
        return _save(self._secret_key)

    def decrypt(self, data: bytes, size: int) -> np.ndarray:
        """Decrypt a ciphertext of this context's top level into ``size`` float64 reals."""
        ct = self.public.load_ciphertext(data)
        return self._decrypt_loaded(ct, size)

    def decrypt_scalar(self, data: bytes) -> float:
        """Slot 0's real part of a derived ciphertext (SEAL serialisation, any level/scale):
        the decryptor's own recomputation of a trust scalar, never a handed ciphertext."""
        return float(self.decrypt_any_level(data)[0])

    def decrypt_any_level(self, data: bytes) -> np.ndarray:
        ct = seal.Ciphertext()
        _load_into(ct, self.context, data, "ciphertext")
        return self._decrypt_loaded(ct, self.preset.params_per_ciphertext)

    def _decrypt_loaded(self, ct: Any, size: int) -> np.ndarray:
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        slots = np.asarray(self._encoder.decode_complex(plain), dtype=np.complex128)
        out = np.empty(2 * slots.size, dtype=np.float64)
        out[0::2] = slots.real
        out[1::2] = slots.imag
        return out[:size]


def decrypt_with_foreign_key(public: PublicContext, data: bytes) -> np.ndarray:
    """What a party without the secret key gets if it tries: a decryption under a fresh,
    unrelated secret key of the same parameters (tests show it is noise)."""
    keygen = seal.KeyGenerator(public.context)
    decryptor = seal.Decryptor(public.context, keygen.secret_key())
    ct = public.load_ciphertext(data)
    plain = seal.Plaintext()
    decryptor.decrypt(ct, plain)
    slots = np.asarray(public.encoder.decode_complex(plain), dtype=np.complex128)
    out = np.empty(2 * slots.size, dtype=np.float64)
    out[0::2] = slots.real
    out[1::2] = slots.imag
    return out


# ---------------------------------------------------------------------------- parallel

_WORKERS = 2
_PARALLEL_MIN_CIPHERTEXTS = 8
_pool: ProcessPoolExecutor | None = None
_pool_pid: int | None = None
_worker_contexts: dict[bytes, PublicContext] = {}


def _get_pool() -> ProcessPoolExecutor:
    """A persistent pool of two forked workers (the machines have two cores).

    ``fork`` keeps start-up cheap (no re-import of torch); workers only run SEAL code.
    """
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool = ProcessPoolExecutor(max_workers=_WORKERS, mp_context=get_context("fork"))
        _pool_pid = os.getpid()
    return _pool


def _worker_context(preset_name: str, data: bytes, digest: bytes) -> PublicContext:
    ctx = _worker_contexts.get(digest)
    if ctx is None:
        _worker_contexts.clear()
        ctx = PublicContext(get_preset(preset_name), data)
        _worker_contexts[digest] = ctx
    return ctx


def _encrypt_task(
    preset_name: str, context: bytes, digest: bytes, values: np.ndarray, seed: bytes | None
) -> list[bytes]:
    ctx = _worker_context(preset_name, context, digest)
    n = ctx.preset.params_per_ciphertext
    return [
        ctx.encrypt_chunk(
            values[i : i + n],
            seed=None if seed is None else hashlib.sha512(seed + struct.pack(">Q", i)).digest(),
        )
        for i in range(0, values.size, n)
    ]


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, count, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def encrypt_vector(
    public: PublicContext,
    values: np.ndarray,
    *,
    seed: bytes | None = None,
    parallel: bool | None = None,
) -> list[bytes]:
    """Pack ``values`` into complete ciphertexts and encrypt them, over both cores.

    With a ``seed`` (64 bytes, seeded simulations only) each half of the vector is
    encrypted under a SEAL PRNG seeded from ``sha256(seed || half index)``, so the result
    does not depend on scheduling.
    """
    flat = np.ascontiguousarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(flat)):
        raise CkksError("cannot encrypt NaN or infinite values")
    n = public.preset.params_per_ciphertext
    count = public.ciphertext_count(flat.size)
    use_pool = parallel if parallel is not None else count >= _PARALLEL_MIN_CIPHERTEXTS
    ranges = _split(count, _WORKERS)
    seeds = [
        None if seed is None else hashlib.sha512(seed + struct.pack(">I", i)).digest()
        for i in range(len(ranges))
    ]
    if not use_pool:
        out: list[bytes] = []
        for (a, b), part_seed in zip(ranges, seeds, strict=True):
            out += _encrypt_task(
                public.preset.name, public.data, public.digest, flat[a * n : b * n], part_seed
            )
        return out if flat.size else [public.encrypt_chunk(flat)]
    pool = _get_pool()
    futures = [
        pool.submit(
            _encrypt_task,
            public.preset.name,
            public.data,
            public.digest,
            flat[a * n : b * n],
            part_seed,
        )
        for (a, b), part_seed in zip(ranges, seeds, strict=True)
    ]
    result: list[bytes] = []
    for future in futures:
        result += future.result()
    return result


def weighted_sum(
    public: PublicContext, ciphertexts: Sequence[Sequence[bytes]], weights: Sequence[int]
) -> list[bytes]:
    """Per-index weighted sum of every contributor's ciphertexts (lists of SFCK v1 blobs)."""
    return public.weighted_sum(ciphertexts, weights)


def weighted_sum_framed(
    public: PublicContext, framed: Sequence[bytes], weights: Sequence[int]
) -> list[bytes]:
    """The server's aggregation: each contributor's framed ``ciphertexts`` field as signed,
    parsed in place (no copies, no SEAL), summed exactly on the RNS residues."""
    return public.weighted_sum_framed(framed, weights)


# ---------------------------------------------------------------------------- baselines


def naive_tenseal_context(preset: CkksPreset) -> Any:
    """The same preset through TenSEAL's high-level API (real slots): the benchmark baseline."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        preset.poly_modulus_degree,
        coeff_mod_bit_sizes=list(preset.coeff_modulus_bits),
    )
    ctx.global_scale = 2.0**preset.scale_bits
    return ctx


def naive_encrypt(ctx: Any, values: np.ndarray, preset: CkksPreset) -> list[bytes]:
    """Single-process ``ckks_vector`` + ``serialize`` per slot-sized chunk."""
    slots = preset.poly_modulus_degree // 2
    return [
        ts.ckks_vector(ctx, values[i : i + slots]).serialize() for i in range(0, values.size, slots)
    ]


def naive_sum(ctx: Any, blobs: Sequence[Sequence[bytes]]) -> list[Any]:
    """Deserialise every client's vectors and ``a + b`` them (allocating) per client."""
    total = [ts.ckks_vector_from(ctx, b) for b in blobs[0]]
    for client in blobs[1:]:
        total = [t + ts.ckks_vector_from(ctx, b) for t, b in zip(total, client, strict=True)]
    return total
