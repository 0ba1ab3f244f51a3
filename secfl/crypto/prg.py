"""The mask PRG: AES-CTR keystream under a full 128- or 256-bit seed, expanded in place.

Definition (normative, see ``protocols/secagg.md``): the mask of seed ``k`` for a vector of
``d`` words of ``w`` bytes (``w`` = 4 for b <= 32, 8 for 32 < b <= 64) is the first ``d*w``
bytes of the AES-CTR keystream under key ``k`` (AES-128 for 16-byte, AES-256 for 32-byte
seeds) with initial counter block 0 (a 128-bit big-endian counter incremented per block),
read as little-endian unsigned words and reduced modulo 2^b. Word ``i`` therefore depends
only on block ``i*w // 16``, so any block-aligned range can be produced on its own: that is
what lets two threads expand one mask without coordination.

Unlike Flower's SecAgg+ (which folds its 32-byte seed to 32 bits and feeds MT19937, so a
mask has at most 2^32 possible values and MT19937 output is predictable), every bit of the
seed keys AES, and AES-CTR is a PRF-based PRG (Bonawitz et al. CCS 2017 §4 assume a secure
PRG; Bell et al. CCS 2020 §3 likewise).

Speed: :class:`MaskEngine` adds or subtracts many masks and arrays into one preallocated
output. It cuts the output into block-aligned, cache-sized chunks; the calling thread and
``threads - 1`` pool helpers each walk their own span of chunks and then steal from the
others (:class:`_Spans`), so the caller never waits for a helper the scheduler has not run.
For every chunk a worker expands each seed's keystream into a small scratch buffer
(``update_into``, which releases the GIL) and adds it with a NumPy ufunc (which also
releases the GIL). Each accumulator chunk stays in the core's L2 cache while all terms are
folded into it, so a mask costs one keystream pass and no extra trip to memory. Arrays (the
server's masked inputs, read from memory) are added over units of several chunks, which
streams faster than chunk-sized runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from secfl.errors import ConfigError

BLOCK_BYTES = 16
SEED_SIZES = (16, 32)
#: Words per chunk: 64 Ki words (256 KiB of u32) keeps accumulator + scratch in L2.
DEFAULT_CHUNK_WORDS = 1 << 16
#: With arrays to add, the unit of work is this many chunks (1 MiB of u32 by default):
#: 100 masked inputs summed in 256 Ki-word runs took 22 ms on one core, in 64 Ki-word runs
#: 30-38 ms (each run restarts the hardware prefetcher on every array).
ARRAY_BLOCK_CHUNKS = 4


def _check_seed(seed: bytes) -> None:
    if len(seed) not in SEED_SIZES:
        raise ConfigError(f"mask PRG seed must be 16 or 32 bytes, got {len(seed)}")


#: The keystream context :func:`ctr_encryptor` returns (its ``update`` / ``update_into``
#: produce keystream XOR input), named here so callers outside ``secfl.crypto`` need not
#: import the hazardous-materials layer to annotate it.
KeystreamContext = CipherContext


def ctr_encryptor(seed: bytes, start_block: int = 0) -> CipherContext:
    """An AES-CTR keystream context for ``seed`` positioned at block ``start_block``."""
    _check_seed(seed)
    if not 0 <= start_block < 2**128:
        raise ConfigError(f"CTR start block must be in [0, 2^128), got {start_block}")
    counter = start_block.to_bytes(BLOCK_BYTES, "big")
    return Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()


def keystream(seed: bytes, nbytes: int, *, start_block: int = 0) -> bytes:
    """``nbytes`` keystream bytes from block ``start_block`` (reference implementation)."""
    if nbytes < 0:
        raise ConfigError(f"number of keystream bytes must be >= 0, got {nbytes}")
    return ctr_encryptor(seed, start_block).update(bytes(nbytes))


def _word_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype == np.uint32:
        return np.dtype("<u4")
    if dtype == np.uint64:
        return np.dtype("<u8")
    raise ConfigError(f"mask words must be uint32 or uint64, got {dtype}")


def expand_into(seed: bytes, out: np.ndarray, *, start_word: int = 0) -> None:
    """Fill ``out`` (uint32/uint64, C-contiguous) with the mask words from ``start_word``.

    One ``update_into`` call over a preallocated buffer; no reduction mod 2^b (callers reduce
    the final sum). ``start_word`` must be block aligned.
    """
    word = _word_dtype(out.dtype)
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ConfigError("expand_into needs a writeable C-contiguous output array")
    start_byte = start_word * word.itemsize
    if start_byte % BLOCK_BYTES:
        raise ConfigError(f"start_word {start_word} is not aligned to a 16-byte block")
    zeros = _zeros(out.nbytes)
    ctr_encryptor(seed, start_byte // BLOCK_BYTES).update_into(
        zeros[: out.nbytes], out.data.cast("B")
    )


_ZEROS: dict[int, memoryview] = {}
_ZEROS_LOCK = threading.Lock()


def _zeros(nbytes: int) -> memoryview:
    """A shared, read-only all-zero buffer of at least ``nbytes`` (the CTR plaintext)."""
    with _ZEROS_LOCK:
        for size, view in _ZEROS.items():
            if size >= nbytes:
                return view
        size = max(nbytes, 1 << 20)
        view = memoryview(bytes(size))
        _ZEROS.clear()
        _ZEROS[size] = view
        return view


class ChunkFill(Protocol):
    """Writes the initial contents of ``out`` = words ``[lo, hi)`` of the result.

    Chunks come in ascending order while a worker walks its own span, but a worker that
    steals work jumps: a filler must handle any block-aligned ``lo`` (re-seek its streams
    when ``lo`` is not where the previous chunk ended)."""

    def __call__(self, lo: int, hi: int, out: np.ndarray, /) -> None: ...


#: Called once per worker with the worker's first word; returns that worker's filler.
FillFactory = Callable[[int], ChunkFill]


def default_threads() -> int:
    """Worker threads of the mask engine: every core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="secfl-mask")
            _POOLS[threads] = pool
        return pool


class _Spans:
    """Chunk indices ``[0, chunks)`` split into one contiguous span per worker, with stealing.

    A worker claims the next chunk of its own span (so its AES-CTR contexts simply run on);
    when its span is empty it steals the upper half of the largest remaining span (the whole
    span of a worker that has not started yet), which costs it one re-seek of its streams.
    A worker that starts after the job is closed does nothing, so the caller never waits for
    a helper thread the scheduler has not run yet (on a loaded machine that can take
    milliseconds); it waits only for helpers that hold a claimed chunk.
    """

    def __init__(self, chunks: int, workers: int) -> None:
        per = -(-chunks // workers)
        self.spans = [[min(chunks, w * per), min(chunks, (w + 1) * per)] for w in range(workers)]
        self.started = [False] * workers
        self.active = 0
        self.closed = False
        self.error: BaseException | None = None
        self.cond = threading.Condition(threading.Lock())

    def enter(self, w: int) -> bool:
        with self.cond:
            if self.closed:
                return False
            self.started[w] = True
            self.active += 1
            return True

    def leave(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.active -= 1
            if error is not None and self.error is None:
                self.error = error
            self.cond.notify_all()

    def claim(self, w: int) -> int | None:
        with self.cond:
            if self.error is not None:
                return None
            span = self.spans[w]
            if span[0] < span[1]:
                span[0] += 1
                return span[0] - 1
            victim, left = -1, 0
            for v, (a, b) in enumerate(self.spans):
                if b - a > left:
                    victim, left = v, b - a
            if victim < 0:
                return None
            vspan = self.spans[victim]
            # an unstarted worker loses its whole span, a running one the upper half
            cut = vspan[1] - (left + 1) // 2 if self.started[victim] else vspan[0]
            span[0], span[1] = cut + 1, vspan[1]
            vspan[1] = cut
            return cut

    def close_and_wait(self) -> None:
        with self.cond:
            self.closed = True
            while self.active:
                self.cond.wait()


class MaskEngine:
    """Folds arrays and PRG masks into one preallocated vector, on several cores.

    ``accumulate(out, add_arrays=, sub_arrays=, add_seeds=, sub_seeds=, fill=)`` computes
    ``out = fill + sum(add_arrays) - sum(sub_arrays) + sum(PRG(add_seeds)) -
    sum(PRG(sub_seeds))`` modulo 2^(8*itemsize) (``out``'s previous contents are replaced;
    without ``fill`` they are the starting value). The caller reduces modulo 2^b.

    The calling thread works too, beside ``threads - 1`` pool helpers; the vector is cut into
    cache-sized chunks handed out by :class:`_Spans` (own span first, then stealing), so on a
    machine whose other core is busy the call degrades to one thread's speed instead of
    waiting for a helper that is not scheduled.
    """

    def __init__(self, *, threads: int | None = None, chunk_words: int = DEFAULT_CHUNK_WORDS):
        threads = default_threads() if threads is None else threads
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if chunk_words < 64 or chunk_words % 4:
            raise ConfigError(f"chunk_words must be a multiple of 4 and >= 64, got {chunk_words}")
        self.threads = threads
        self.chunk_words = chunk_words

    def accumulate(
        self,
        out: np.ndarray,
        *,
        add_arrays: Sequence[np.ndarray] = (),
        sub_arrays: Sequence[np.ndarray] = (),
        add_seeds: Sequence[bytes] = (),
        sub_seeds: Sequence[bytes] = (),
        fill: FillFactory | None = None,
    ) -> np.ndarray:
        word = _word_dtype(out.dtype)
        if out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ConfigError("the mask engine needs a writeable 1-D C-contiguous output")
        for array in (*add_arrays, *sub_arrays):
            if array.shape != out.shape or array.dtype != out.dtype:
                raise ConfigError(
                    f"every term must have shape {out.shape} and dtype {out.dtype}, got "
                    f"{array.shape} {array.dtype}"
                )
        for seed in (*add_seeds, *sub_seeds):
            _check_seed(seed)
        # a multiple of 4 words: chunk starts stay block aligned. Arrays are read from memory
        # (the server's masked inputs): they stream faster in longer runs, so with arrays the
        # unit of work is ARRAY_BLOCK_CHUNKS chunks (arrays over the whole unit, keystreams
        # chunk by chunk while the accumulator chunk is in L2).
        chunk = self.chunk_words * (ARRAY_BLOCK_CHUNKS if add_arrays or sub_arrays else 1)
        chunks = -(-out.size // chunk)
        workers = max(1, min(self.threads, chunks))
        spans = _Spans(chunks, workers)
        args = (out, word, chunk, spans, add_arrays, sub_arrays, add_seeds, sub_seeds, fill)
        for w in range(1, workers):
            _pool(self.threads - 1).submit(self._work, w, *args)
        error: BaseException | None = None
        try:
            self._work(0, *args)
        except BaseException as exc:  # re-raised below, after the helpers
            error = exc
        spans.close_and_wait()
        error = error or spans.error
        if error is not None:
            raise error
        return out

    def _work(
        self,
        w: int,
        out: np.ndarray,
        word: np.dtype[Any],
        unit: int,
        spans: _Spans,
        add_arrays: Sequence[np.ndarray],
        sub_arrays: Sequence[np.ndarray],
        add_seeds: Sequence[bytes],
        sub_seeds: Sequence[bytes],
        fill: FillFactory | None,
    ) -> None:
        if not spans.enter(w):
            return
        error: BaseException | None = None
        try:
            self._walk(
                w, out, word, unit, spans, add_arrays, sub_arrays, add_seeds, sub_seeds, fill
            )
        except BaseException as exc:  # handed to the caller by _Spans
            error = exc
        spans.leave(error)
        if w == 0 and error is not None:
            raise error

    def _walk(
        self,
        w: int,
        out: np.ndarray,
        word: np.dtype[Any],
        unit: int,
        spans: _Spans,
        add_arrays: Sequence[np.ndarray],
        sub_arrays: Sequence[np.ndarray],
        add_seeds: Sequence[bytes],
        sub_seeds: Sequence[bytes],
        fill: FillFactory | None,
    ) -> None:
        size, chunk, itemsize = out.size, self.chunk_words, word.itemsize
        index = spans.claim(w)
        if index is None:
            return
        scratch = np.empty(min(chunk, size), dtype=word)
        scratch_bytes = scratch.data.cast("B")
        zeros = _zeros(scratch.nbytes)
        filler = fill(index * unit) if fill is not None else None
        add, sub = np.add, np.subtract
        plus: list[CipherContext] = []
        minus: list[CipherContext] = []
        position = -1  # the unit the streams are positioned at
        while index is not None:
            if index != position:  # first unit, or a stolen one: (re)position the streams
                block = index * unit * itemsize // BLOCK_BYTES
                plus = [ctr_encryptor(s, block) for s in add_seeds]
                minus = [ctr_encryptor(s, block) for s in sub_seeds]
            u0 = index * unit
            u1 = min(size, u0 + unit)
            if filler is not None:
                for c0 in range(u0, u1, chunk):
                    c1 = min(u1, c0 + chunk)
                    filler(c0, c1, out[c0:c1])
            if add_arrays or sub_arrays:
                acc = out[u0:u1]
                for array in add_arrays:
                    add(acc, array[u0:u1], out=acc)
                for array in sub_arrays:
                    sub(acc, array[u0:u1], out=acc)
            for c0 in range(u0, u1, chunk):
                c1 = min(u1, c0 + chunk)
                n = c1 - c0
                nbytes = n * itemsize
                acc = out[c0:c1]
                s = scratch[:n]
                z = zeros[:nbytes]
                sb = scratch_bytes[:nbytes]
                for encryptor in plus:
                    encryptor.update_into(z, sb)
                    add(acc, s, out=acc)
                for encryptor in minus:
                    encryptor.update_into(z, sb)
                    sub(acc, s, out=acc)
            position = index + 1
            index = spans.claim(w)


def reduce_mod(out: np.ndarray, bits: int) -> np.ndarray:
    """``out %= 2^bits`` in place (a no-op when bits equals the word size)."""
    width = out.dtype.itemsize * 8
    if not 1 <= bits <= width:
        raise ConfigError(f"bits must be in [1, {width}] for {out.dtype}, got {bits}")
    if bits < width:
        np.bitwise_and(out, out.dtype.type((1 << bits) - 1), out=out)
    return out
