"""Encoding an update into Z_{2^b}: clip, weight, stochastic rounding; and decoding a sum.

Client u with update x and sample count m encodes, per coordinate i,

    q_i = floor(w * clip(x_i, -C, C) * 2^(r-1)/C + U_i)   (mod 2^b),   w = min(m, w_max)

with U_i uniform in [0, 1) from an AES-CTR stream (so rounding is unbiased: E[q_i] equals
the scaled value), and appends w itself as coordinate d. Every |q_i| <= w * 2^(r-1), so the
sum over n clients is bounded by n * w_max * 2^(r-1), which ``params.derive_params`` makes
fit in the signed range of b bits. The server learns sum_u q_u and sum_u w_u only, never a
single w_u, and decodes the weighted mean sum_u w_u x_u / sum_u w_u with an error of at most
|survivors| quanta (C / 2^(r-1) each) per coordinate over the total weight.

Rounding uses fixed point with 32 fraction bits: floor(v * 2^32) + U (U a u32 word), then an
arithmetic shift right by 32. The first floor makes the rounding probability exact to 2^-32.
"""

from __future__ import annotations

import numpy as np

from secfl.crypto.prg import ChunkFill, FillFactory, ctr_encryptor
from secfl.errors import UpdateError
from secfl.secagg.params import ROUNDING_FRACTION_BITS, SecAggParams

_FRACTION_SCALE = float(2**ROUNDING_FRACTION_BITS)


def client_weight(params: SecAggParams, num_samples: int) -> int:
    """The weight a client uses: its sample count capped at ``max_weight`` (or 1)."""
    if num_samples < 1:
        raise UpdateError(f"num_samples must be >= 1, got {num_samples}")
    if params.weighting == "uniform":
        return 1
    return min(int(num_samples), params.max_weight)


def encoding_fill(
    params: SecAggParams, update: np.ndarray, weight: int, rounding_seed: bytes, chunk: int
) -> FillFactory:
    """A :class:`~secfl.crypto.prg.MaskEngine` fill that writes the encoded update.

    Coordinate i uses rounding word i of the AES-CTR stream under ``rounding_seed`` (4 bytes
    per coordinate), so the result does not depend on how the vector is cut into ranges.
    """
    x = np.ascontiguousarray(update, dtype=np.float32)
    d = x.size
    if not np.isfinite(x).all():
        raise UpdateError("update holds NaN or Inf; refusing to encode it")
    if not 1 <= weight <= params.weight_bound:
        raise UpdateError(f"weight must be in [1, {params.weight_bound}], got {weight}")
    factor = float(weight) * params.unit * _FRACTION_SCALE
    clip = float(params.clip_range)
    zeros = bytes(4 * chunk)

    def factory(lo: int) -> ChunkFill:
        if (4 * lo) % 16:
            raise UpdateError(f"encoding range start {lo} is not block aligned")
        stream = ctr_encryptor(rounding_seed, (4 * lo) // 16)
        words = np.empty(chunk, dtype="<u4")
        words_bytes = memoryview(words).cast("B")
        real = np.empty(chunk, dtype=np.float64)
        whole = np.empty(chunk, dtype=np.int64)

        def fill(c0: int, c1: int, out: np.ndarray) -> None:
            n = c1 - c0
            stream.update_into(zeros[: 4 * n], words_bytes[: 4 * n])
            m = max(0, min(c1, d) - c0)
            if m:
                r = real[:m]
                np.clip(x[c0 : c0 + m], -clip, clip, out=r)
                np.multiply(r, factor, out=r)
                np.floor(r, out=r)
                w = whole[:m]
                np.copyto(w, r, casting="unsafe")
                np.add(w, words[:m], out=w, casting="unsafe")
                np.right_shift(w, ROUNDING_FRACTION_BITS, out=w)
                np.copyto(out[:m], w, casting="unsafe")
            if c1 == d + 1:
                out[n - 1] = weight

        return fill

    return factory


def encode_reference(
    params: SecAggParams, update: np.ndarray, weight: int, rounding_seed: bytes
) -> np.ndarray:
    """Slow, obviously-right encoding (tests compare the fast path against it)."""
    from secfl.crypto.prg import keystream

    x = np.asarray(update, dtype=np.float64)
    d = x.size
    u = np.frombuffer(keystream(rounding_seed, 4 * (d + 1)), dtype="<u4")[:d]
    scaled = np.floor(np.clip(x, -params.clip_range, params.clip_range) * weight * params.unit
                      * _FRACTION_SCALE)
    q = (scaled.astype(np.int64) + u.astype(np.int64)) >> ROUNDING_FRACTION_BITS
    out = np.empty(d + 1, dtype=params.word_dtype)
    out[:d] = q.astype(params.word_dtype)  # two's complement wrap
    out[d] = weight
    mask = (1 << params.bits) - 1
    return (out & params.word_dtype.type(mask)) if params.bits < 8 * out.itemsize else out


def decode_sum(params: SecAggParams, total: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(weighted mean as float32, total weight, signed integer sum) from the unmasked sum."""
    if total.ndim != 1 or total.size < 2:
        raise UpdateError(f"an unmasked sum has d + 1 >= 2 words, got shape {total.shape}")
    bits = params.bits
    values = total[:-1].astype(np.uint64)
    total_weight = int(total[-1])
    if total_weight < 1:
        raise UpdateError(f"total weight of the survivors is {total_weight}; nothing to average")
    half = np.uint64(1 << (bits - 1))
    if bits == 64:
        signed = values.view(np.int64).astype(np.float64)
    else:
        signed = values.astype(np.int64) - (values >= half).astype(np.int64) * (1 << bits)
        signed = signed.astype(np.float64)
    mean = (signed / (params.unit * total_weight)).astype(np.float32)
    return mean, total_weight, signed
