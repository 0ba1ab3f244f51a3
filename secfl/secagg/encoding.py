"""Encoding an update into Z_{2^b}: clip, weight, stochastic rounding; and decoding a sum.

Client u with update x and sample count m encodes, per coordinate i (float64 arithmetic),

    q_i = round_half_even( clip(x_i, -C, C) * w * 2^(r-1)/C  +  J_i * 2^-16 )   (mod 2^b)

with w = min(m, w_max) and J_i the i-th little-endian *signed* 16-bit word of the AES-CTR
stream under the client's rounding seed, so J_i * 2^-16 is uniform on the grid of step
2^-16 in [-1/2, 1/2): this is stochastic rounding, unbiased up to the grid (below 2^-16 of a
quantum) and the float64 rounding of the sum (below 2^-22 of a quantum, since
|value| <= 2^30). Sixteen bits of jitter take half the AES-CTR keystream of 32 (the rounding
stream is 1/(k+2) of a client's AES work) at a bias far below the rounding noise itself
(a standard deviation of up to 1/2 quantum per coordinate). Coordinate d holds w itself. As
w * 2^(r-1) = L is even, |q_i| <= L, so the sum over n clients is bounded by
n * w_max * 2^(r-1), which ``params.derive_params`` makes fit in the signed range of b bits.
The server learns sum_u q_u and sum_u w_u only, never a single w_u, and decodes the weighted
mean sum_u w_u x_u / sum_u w_u with an error below |survivors| quanta (C / 2^(r-1) each) per
coordinate over the total weight.

Fast path: round_half_even(t) for |t| < 2^51 is read from the low mantissa bits of
t + 1.5 * 2^52 (the "magic number" conversion). It works on everything scaled by 2^16,
which is exact in float64 (a power-of-two scale commutes with rounding away from subnormals
and overflow, and here |2^16 t| < 2^67): fl(fl(c * w * unit * 2^16) + J) = 2^16 * fl(c * w *
unit + J * 2^-16), and adding 1.5 * 2^68 rounds that to a multiple of 2^16 half-to-even, so
the low 32 mantissa bits hold q mod 2^32 exactly as before. That lets the signed jitter word
be added as is (no separate jitter array). Per cache-resident chunk: clip into float64,
multiply, add the jitter words, add the magic number, and one cast to the output
words; ``encode_reference`` computes the same numbers with ``np.rint``.
"""

from __future__ import annotations

import numpy as np

from secfl.crypto.prg import (
    BLOCK_BYTES,
    ChunkFill,
    FillFactory,
    KeystreamContext,
    ctr_encryptor,
)
from secfl.errors import UpdateError
from secfl.secagg.params import SecAggParams

#: Rounding jitter: a signed 16-bit word times 2^-16 is uniform on a 2^-16 grid in [-1/2, 1/2).
_JITTER_BYTES = 2
_JITTER_DTYPE = "<i2"
_JITTER_SCALE = 2.0**-16
#: 1.5 * 2^68: adding it to |2^16 t| < 2^67 leaves round-half-even(t) in the low mantissa
#: bits (the usual 1.5 * 2^52 conversion, scaled by 2^16; see the module docstring).
_MAGIC = 1.5 * 2.0**68
_MAGIC_BITS = np.array(_MAGIC).view(np.int64)[()]


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

    Coordinate i uses rounding word i of the AES-CTR stream under ``rounding_seed`` (2 bytes
    per coordinate), so the result does not depend on how the vector is cut into chunks or
    in which order a worker visits them.
    Six float64 passes per cache-resident chunk; no integer temporaries (see module doc).
    """
    x = np.ascontiguousarray(update, dtype=np.float32)
    d = x.size
    if not 1 <= weight <= params.weight_bound:
        raise UpdateError(f"weight must be in [1, {params.weight_bound}], got {weight}")
    # scaled by 2^16 so the jitter word is added unscaled (exact; see the module docstring)
    scale = float(weight) * params.unit * 2.0**16
    clip = float(params.clip_range)
    zeros = bytes(_JITTER_BYTES * chunk)
    wide = params.word_dtype == np.uint64

    def seek(word: int) -> KeystreamContext:
        """The rounding stream positioned at jitter word ``word``."""
        start, skip = divmod(_JITTER_BYTES * word, BLOCK_BYTES)
        stream = ctr_encryptor(rounding_seed, start)
        if skip:
            stream.update(bytes(skip))
        return stream

    def factory(lo: int) -> ChunkFill:
        stream = seek(lo)
        position = [lo]  # the word the rounding stream is positioned at
        words = np.empty(chunk, dtype=_JITTER_DTYPE)
        words_bytes = words.data.cast("B")
        real = np.empty(chunk, dtype=np.float64)
        bits = real.view(np.int64)
        clip_, multiply, add, copyto, subtract, reduce = (
            np.clip,
            np.multiply,
            np.add,
            np.copyto,
            np.subtract,
            np.add.reduce,
        )

        def fill(c0: int, c1: int, out: np.ndarray, /) -> None:
            nonlocal stream
            n = c1 - c0
            if c0 != position[0]:  # a stolen chunk: re-seek the rounding stream
                stream = seek(c0)
            position[0] = c1
            nbytes = _JITTER_BYTES * n
            stream.update_into(zeros[:nbytes], words_bytes[:nbytes])
            m = max(0, min(c1, d) - c0)
            if m:
                values = x[c0 : c0 + m]
                # NaN/Inf checked while the chunk is in cache; the error reaches the caller
                if not np.isfinite(reduce(values)):
                    raise UpdateError(
                        "update holds NaN, Inf or values beyond 1e33; refusing to encode it"
                    )
                r = real[:m]
                clip_(values, -clip, clip, out=r)
                multiply(r, scale, out=r)
                add(r, words[:m], out=r)
                add(r, _MAGIC, out=r)
                if wide:
                    subtract(bits[:m], _MAGIC_BITS, out=out[:m].view(np.int64))
                else:
                    copyto(out[:m], bits[:m], casting="unsafe")  # low 32 bits: q mod 2^32
            if c1 == d + 1:
                out[n - 1] = weight

        return fill

    return factory


def encode_reference(
    params: SecAggParams, update: np.ndarray, weight: int, rounding_seed: bytes
) -> np.ndarray:
    """Slow, obviously-right encoding (tests compare the fast path against it)."""
    from secfl.crypto.prg import keystream

    x = np.asarray(update, dtype=np.float32).astype(np.float64)
    d = x.size
    words = np.frombuffer(keystream(rounding_seed, _JITTER_BYTES * d), dtype=_JITTER_DTYPE)
    t = np.clip(x, -params.clip_range, params.clip_range) * (float(weight) * params.unit)
    t = t + words.astype(np.float64) * _JITTER_SCALE
    q = np.rint(t).astype(np.int64)  # round half to even, as the magic-number addition
    out = np.empty(d + 1, dtype=params.word_dtype)
    out[:d] = q.astype(params.word_dtype)  # two's complement wrap
    out[d] = weight
    return out


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
        wrapped = values.astype(np.int64) - (values >= half).astype(np.int64) * (1 << bits)
        signed = wrapped.astype(np.float64)
    mean = (signed / (params.unit * total_weight)).astype(np.float32)
    return mean, total_weight, signed


def decode_mean(params: SecAggParams, total: np.ndarray) -> tuple[np.ndarray, int]:
    """(weighted mean as float32, total weight): the numbers :func:`decode_sum` gives, in one
    full-vector pass for b equal to the word size (two shifts in place of the wrap otherwise).

    The signed value of a word is read by reinterpreting it as a signed word (shifted so bit
    b-1 is the sign bit, then shifted back arithmetically); the division runs in float64 and
    rounds once to float32, as ``decode_sum`` does.
    """
    if total.ndim != 1 or total.size < 2:
        raise UpdateError(f"an unmasked sum has d + 1 >= 2 words, got shape {total.shape}")
    if total.dtype not in (np.uint32, np.uint64):
        raise UpdateError(f"an unmasked sum has uint32 or uint64 words, got {total.dtype}")
    total_weight = int(total[-1])
    if total_weight < 1:
        raise UpdateError(f"total weight of the survivors is {total_weight}; nothing to average")
    words = total[:-1]
    width = 8 * words.dtype.itemsize
    signed_dtype = np.int32 if width == 32 else np.int64
    shift = width - params.bits
    if shift:
        shifted = np.left_shift(words, words.dtype.type(shift))
        signed = shifted.view(signed_dtype)
        np.right_shift(signed, signed_dtype(shift), out=signed)
    else:
        signed = words.view(signed_dtype)
    mean = np.empty(words.size, dtype=np.float32)
    np.divide(
        signed,
        params.unit * total_weight,
        out=mean,
        dtype=np.float64,
        casting="same_kind",
    )
    return mean, total_weight
