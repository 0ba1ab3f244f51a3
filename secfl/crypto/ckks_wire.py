"""secfl's CKKS ciphertext encoding (``SFCK`` v1) and exact weighted sums on RNS residues.

Plain NumPy, no TenSEAL: the server aggregates without SEAL. A fresh CKKS ciphertext is two
polynomials in NTT form, each stored as one residue vector per data prime ``q_j`` (SEAL's
RNS representation). A weighted sum with non-negative integer weights is exact modular
arithmetic on those residues, coefficient by coefficient:

    sum_i w_i * c_i  mod q_j   for every prime j, polynomial p and coefficient t,

which equals what SEAL's ``multiply_plain`` (integer at scale 1) and ``add`` compute, bit for
bit (SEAL reduces each operation; we reduce once at the end; both give the canonical residue
in [0, q_j)).

Encoding of one ciphertext (all sizes fixed by the parameters, so a blob has one valid length)::

    offset 0   4 bytes  magic "SFCK"
    offset 4   u8       version (1)
    offset 5   u8       polys P (2: a fresh public-key ciphertext)
    offset 6   u8       primes L (data primes, SEAL's order)
    offset 7   u8       scale_bits (the scale is 2^scale_bits)
    offset 8   u32 BE   N (ring degree)
    offset 12  L x u64 BE  the primes q_0 .. q_{L-1}
    then       for p in 0..P-1, for j in 0..L-1: N residues, each an unsigned little-endian
               integer of w_j bytes, w_j = 4 if q_j < 2^32 else ceil(bits(q_j) / 8);
               every residue < q_j (SEAL's coefficient order, NTT form).

Every residue is checked to be below its prime when parsed; integrity against tampering
comes from the client's signature over the exact bytes (``protocols/ckks_aggregation.md``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from secfl.errors import CkksError

MAGIC = b"SFCK"
VERSION = 1
_HEAD = struct.Struct(">4sBBBBI")
_LENGTH_PREFIX = 4
#: Largest total weight the exact uint64 accumulation holds: every partial sum of
#: ``w_i * r`` with ``r < 2^32`` (a narrow residue, or either 32-bit half of a wide one)
#: stays below ``W * 2^32 <= 2^64``.
MAX_TOTAL_WEIGHT = 2**32 - 1
#: Target size of one block of accumulators (ciphertexts summed together, kept in cache).
_BLOCK_BYTES = 2 * 2**20


def word_bytes(prime: int) -> int:
    """Bytes per residue of ``prime``: 4 below 2^32 (aligned, read in place), else the
    smallest whole number of bytes."""
    bits = prime.bit_length()
    return 4 if bits <= 32 else (bits + 7) // 8


@dataclass(frozen=True)
class CiphertextFormat:
    """The ``SFCK`` v1 layout for one parameter set (ring degree, data primes, scale)."""

    poly_modulus_degree: int
    primes: tuple[int, ...]
    scale_bits: int
    polys: int = 2
    header: bytes = field(init=False)
    widths: tuple[int, ...] = field(init=False)
    blob_size: int = field(init=False)
    #: Byte offset (within a blob) of each (poly, prime) residue vector, poly-major.
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n < 1 or n >= 2**32:
            raise CkksError(f"ring degree must be in [1, 2^32), got {n}")
        if not 1 <= len(self.primes) <= 255 or not 1 <= self.polys <= 255:
            raise CkksError(
                f"{len(self.primes)} primes and {self.polys} polynomials: both must be 1..255"
            )
        for q in self.primes:
            if not 2 <= q < 2**61:
                raise CkksError(f"prime {q} is outside [2, 2^61), the range this encoding sums")
        header = _HEAD.pack(
            MAGIC, VERSION, self.polys, len(self.primes), self.scale_bits, n
        ) + b"".join(struct.pack(">Q", q) for q in self.primes)
        widths = tuple(word_bytes(q) for q in self.primes)
        offsets = []
        offset = len(header)
        for _ in range(self.polys):
            for w in widths:
                offsets.append(offset)
                offset += n * w
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "blob_size", offset)

    @property
    def segments(self) -> int:
        return self.polys * len(self.primes)

    def describe(self) -> str:
        return (
            f"N={self.poly_modulus_degree}, {self.polys} polynomials, primes "
            f"{list(self.primes)}, scale 2^{self.scale_bits}"
        )

    # -- one ciphertext -------------------------------------------------------------------

    def encode(self, residues: np.ndarray) -> bytes:
        """``residues`` of shape (polys, primes, N), each below its prime, as one blob."""
        expected = (self.polys, len(self.primes), self.poly_modulus_degree)
        if residues.shape != expected:
            raise CkksError(f"residues of shape {residues.shape}, expected {expected}")
        flat = residues.reshape(1, self.segments, self.poly_modulus_degree)
        self._check_range(flat.astype(np.uint64, copy=False), "residues to encode")
        if all(w == 4 for w in self.widths):  # the common case: one cast, no scatter
            return self.header + flat.astype("<u4").tobytes()
        blob = np.empty((1, self.blob_size), dtype=np.uint8)
        blob[0, : len(self.header)] = np.frombuffer(self.header, dtype=np.uint8)
        self._write(blob, flat)
        return blob[0].tobytes()

    def decode(self, blob: bytes) -> np.ndarray:
        """The residues (polys, primes, N) of one blob, uint64, checked."""
        self._check_blob(blob, "ciphertext")
        framed = struct.pack(">I", len(blob)) + blob
        views = self._views(framed, 1)
        out = np.empty((self.segments, self.poly_modulus_degree), dtype=np.uint64)
        for s, view in enumerate(views):
            out[s] = self._read(view, 0, 1)[0]
        self._check_range(out[None], "ciphertext")
        return out.reshape(self.polys, len(self.primes), self.poly_modulus_degree)

    def _check_blob(self, blob: bytes, what: str) -> None:
        if blob[: len(self.header)] != self.header:
            raise CkksError(
                f"cannot load {what}: {self._header_problem(blob[: len(self.header)])} "
                "(corrupted bytes, or made under different CKKS parameters)"
            )
        if len(blob) != self.blob_size:
            raise CkksError(
                f"cannot load {what}: {len(blob)} bytes, an SFCK v1 ciphertext for "
                f"{self.describe()} has exactly {self.blob_size}"
            )

    def _header_problem(self, head: bytes) -> str:
        if len(head) < _HEAD.size or head[:4] != MAGIC:
            return "not an SFCK ciphertext (bad magic)"
        _, version, polys, primes, scale_bits, n = _HEAD.unpack_from(head, 0)
        if version != VERSION:
            return f"SFCK version {version}, this build reads version {VERSION}"
        got = [struct.unpack_from(">Q", head, _HEAD.size + 8 * j)[0] for j in range(primes)]
        return (
            f"header says N={n}, {polys} polynomials, primes {got[: len(self.primes)]}, scale "
            f"2^{scale_bits}; this context expects {self.describe()}"
        )

    # -- many ciphertexts, framed (u32 BE length || blob)* ---------------------------------

    def count_framed(self, framed: bytes, what: str = "ciphertexts") -> int:
        """Number of blobs in a framed list, after checking every length prefix and header."""
        stride = _LENGTH_PREFIX + self.blob_size
        head = framed[_LENGTH_PREFIX : _LENGTH_PREFIX + len(self.header)]
        if len(framed) > _LENGTH_PREFIX and head != self.header:
            raise CkksError(
                f"{what}: cannot load ciphertext 0: {self._header_problem(head)} "
                "(corrupted bytes, or made under different CKKS parameters)"
            )
        if len(framed) == 0 or len(framed) % stride:
            raise CkksError(
                f"{what}: {len(framed)} bytes is not a whole, non-zero number of framed "
                f"SFCK v1 ciphertexts of {self.blob_size} bytes each"
            )
        count = len(framed) // stride
        table = np.ndarray(
            shape=(count, _LENGTH_PREFIX + len(self.header)),
            dtype=np.uint8,
            buffer=framed,
            strides=(stride, 1),
        )
        expected = np.frombuffer(struct.pack(">I", self.blob_size) + self.header, dtype=np.uint8)
        bad = np.flatnonzero((table != expected).any(axis=1))
        if bad.size:
            k = int(bad[0])
            head = bytes(table[k])
            if head[:4] != expected[:4].tobytes():
                raise CkksError(
                    f"{what}: ciphertext {k} has length {struct.unpack('>I', head[:4])[0]}, "
                    f"an SFCK v1 ciphertext for {self.describe()} has {self.blob_size}"
                )
            raise CkksError(
                f"{what}: cannot load ciphertext {k}: {self._header_problem(head[4:])} "
                "(corrupted bytes, or made under different CKKS parameters)"
            )
        return count

    def _views(self, framed: bytes, count: int) -> list[np.ndarray]:
        """Per (poly, prime): a strided (count, N, width) byte view, or a (count, N) uint32 /
        uint64 view where the width allows reading in place."""
        stride = _LENGTH_PREFIX + self.blob_size
        n = self.poly_modulus_degree
        views = []
        for s, offset in enumerate(self.offsets):
            w = self.widths[s % len(self.primes)]
            if w in (4, 8):
                views.append(
                    np.ndarray(
                        shape=(count, n),
                        dtype=np.dtype(f"<u{w}"),
                        buffer=framed,
                        offset=_LENGTH_PREFIX + offset,
                        strides=(stride, w),
                    )
                )
            else:
                views.append(
                    np.ndarray(
                        shape=(count, n, w),
                        dtype=np.uint8,
                        buffer=framed,
                        offset=_LENGTH_PREFIX + offset,
                        strides=(stride, w, 1),
                    )
                )
        return views

    @staticmethod
    def _read(view: np.ndarray, first: int, last: int) -> np.ndarray:
        part = view[first:last]
        if part.ndim == 2:
            return part
        padded = np.zeros((*part.shape[:2], 8), dtype=np.uint8)
        padded[:, :, : part.shape[2]] = part
        return padded.view("<u8")[:, :, 0]

    def _check_range(self, residues: np.ndarray, what: str, first: int = 0) -> None:
        """``residues`` (count, segments, N): every residue below its prime."""
        primes = np.array(self.primes * self.polys, dtype=np.uint64)
        tops = residues.max(axis=2)  # (count, segments)
        if not (tops < primes).all():
            for s in range(self.segments):
                q = self.primes[s % len(self.primes)]
                bad = np.flatnonzero(tops[:, s] >= q)
                if not bad.size:
                    continue
                raise CkksError(
                    f"cannot load {what}: ciphertext {first + int(bad[0])} has a residue "
                    f">= its prime {q} (polynomial {s // len(self.primes)}); residues must "
                    "be in [0, q) (corrupted bytes, or different CKKS parameters)"
                )

    def _write(self, blob: np.ndarray, residues: np.ndarray) -> None:
        """Fill the residue part of ``blob`` (count, blob_size) from (count, segments, N)."""
        count, n = blob.shape[0], self.poly_modulus_degree
        for s, offset in enumerate(self.offsets):
            w = self.widths[s % len(self.primes)]
            target = blob[:, offset : offset + n * w].reshape(count, n, w)
            if w in (4, 8):
                target[:] = residues[:, s].astype(f"<u{w}").view(np.uint8).reshape(count, n, w)
            else:
                wide = residues[:, s].astype("<u8").view(np.uint8).reshape(count, n, 8)
                target[:] = wide[:, :, :w]

    # -- the weighted sum -------------------------------------------------------------------

    def weighted_sum(self, framed: Sequence[bytes], weights: Sequence[int]) -> list[bytes]:
        """``sum_i weights[i] * ct_i[k]`` for every index k, each an SFCK v1 blob.

        ``framed[i]`` is contributor i's framed ciphertext list exactly as it was signed.
        Exact: residues are accumulated in uint64 (narrow primes directly, wide primes as two
        32-bit halves), in place, a block of ciphertext indices at a time so the accumulators
        stay in cache, and reduced modulo each prime once at the end.
        """
        if not framed or len(framed) != len(weights):
            raise CkksError(
                f"a weighted sum needs >= 1 contributor and one weight each, got "
                f"{len(framed)} contributors and {len(weights)} weights"
            )
        for w in weights:
            if not (isinstance(w, int) and not isinstance(w, bool) and w >= 1):
                raise CkksError(f"weights must be positive integers, got {w!r}")
        if sum(weights) > MAX_TOTAL_WEIGHT:
            raise CkksError(
                f"total weight {sum(weights)} exceeds {MAX_TOTAL_WEIGHT}, the most the exact "
                "uint64 residue accumulation holds"
            )
        count = self.count_framed(framed[0], "contributor 0")
        for i, data in enumerate(framed[1:], start=1):
            got = self.count_framed(data, f"contributor {i}")
            if got != count:
                raise CkksError(f"contributor {i} sent {got} ciphertexts, expected {count}")
        views = [self._views(data, count) for data in framed]
        n, segs, nprimes = self.poly_modulus_degree, self.segments, len(self.primes)
        wide = [self.primes[s % nprimes] >= 2**32 for s in range(segs)]
        block = max(1, min(count, _BLOCK_BYTES // (8 * segs * n)))
        acc = np.empty((block, segs, n), dtype=np.uint64)
        high = np.empty((block, segs, n), dtype=np.uint64) if any(wide) else acc
        tmp = np.empty((block, n), dtype=np.uint64)
        mask = np.uint64(0xFFFFFFFF)
        out: list[bytes] = []
        for first in range(0, count, block):
            last = min(count, first + block)
            b = last - first
            acc[:b] = 0
            if any(wide):
                high[:b] = 0
            for i, (client, weight) in enumerate(zip(views, weights, strict=True)):
                factor = np.uint64(weight)
                t = tmp[:b]
                for s in range(segs):
                    q = self.primes[s % nprimes]
                    r = self._read(client[s], first, last)
                    top = r.max(axis=1)
                    if (top >= q).any():
                        k = first + int(np.flatnonzero(top >= q)[0])
                        raise CkksError(
                            f"contributor {i}, ciphertext {k}: a residue >= its prime {q}; "
                            "residues must be in [0, q) (corrupted or forged ciphertext)"
                        )
                    if wide[s]:
                        np.bitwise_and(r, mask, out=t)
                        np.multiply(t, factor, out=t)
                        np.add(acc[:b, s], t, out=acc[:b, s])
                        np.right_shift(r, np.uint64(32), out=t)
                        np.multiply(t, factor, out=t)
                        np.add(high[:b, s], t, out=high[:b, s])
                    else:
                        np.multiply(r, factor, out=t)
                        np.add(acc[:b, s], t, out=acc[:b, s])
            result = np.empty((b, segs, n), dtype=np.uint64)
            for s in range(segs):
                modulus = np.uint64(self.primes[s % nprimes])
                if wide[s]:
                    result[:, s] = _times_2_32_mod(high[:b, s] % modulus, int(modulus))
                    result[:, s] += acc[:b, s] % modulus  # both < q < 2^61: no overflow
                    result[:, s] %= modulus
                else:
                    np.remainder(acc[:b, s], modulus, out=result[:, s])
            blob = np.empty((b, self.blob_size), dtype=np.uint8)
            blob[:, : len(self.header)] = np.frombuffer(self.header, dtype=np.uint8)
            self._write(blob, result)
            out.extend(row.tobytes() for row in blob)
        return out


def _times_2_32_mod(h: np.ndarray, q: int) -> np.ndarray:
    """``h * 2^32 mod q`` for ``h < q < 2^61``, exactly: shifts of ``64 - bits(q)`` bits,
    each followed by a reduction, so no intermediate reaches 2^64."""
    step = 64 - q.bit_length()
    out = h.copy()
    done = 0
    modulus = np.uint64(q)
    while done < 32:
        s = min(step, 32 - done)
        np.left_shift(out, np.uint64(s), out=out)
        np.remainder(out, modulus, out=out)
        done += s
    return out
