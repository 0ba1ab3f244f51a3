"""Benchmark ``ckks``: the CKKS client and server paths against single-process TenSEAL.

Measured in one run, side by side (the machines are shared and noisy):

* client: ``encrypt_vector`` + framing (complete complex-packed ciphertexts over both cores)
  against TenSEAL ``ckks_vector`` + ``serialize`` per slot-sized chunk, same vector, same
  preset (ring degree, primes, scale), one process;
* server: ``weighted_sum_framed`` from each client's framed ``ciphertexts`` bytes exactly as
  received (length and header checks, residue range checks, exact uint64 accumulation of the
  RNS residues, reduction, serialisation of the sums; no SEAL) against TenSEAL
  ``ckks_vector_from`` then ``a + b`` per client, same preset; the two are timed alternately
  (ours, naive, ours, ...) so both see the same machine load;
* expansion: serialised ciphertext bytes per float32 byte;
* error: the decryptor's flooded weighted mean of n=100 clients with inputs spanning ±C,
  against the exact weighted mean, in units of C.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from secfl.audit.events import EventLog
from secfl.bench.harness import BenchSettings, median, register_benchmark, time_repeats
from secfl.crypto import ckks
from secfl.crypto.sign import SigningKey
from secfl.errors import BenchmarkError
from secfl.he.client import encrypt_update
from secfl.he.decryptor import Decryptor, DecryptorPolicy
from secfl.he.messages import (
    ContextReply,
    ContextRequest,
    SumRelease,
    SumRequest,
    frame_blobs,
)
from secfl.randomness import Randomness
from secfl.wire import decode_message

CLIP = 1.0
BITS = 40
BUDGET = 2**16


def _client_figures(
    preset: ckks.CkksPreset, d: int, repeats: int, *, baseline: bool
) -> dict[str, Any]:
    secret = ckks.SecretContext(preset)
    public = ckks.PublicContext(preset, secret.client_context_bytes())
    rng = np.random.default_rng(0)  # benchmark data, not secret
    x = rng.uniform(-CLIP, CLIP, d)
    ours = median(time_repeats(lambda: frame_blobs(ckks.encrypt_vector(public, x)), repeats))
    blobs = ckks.encrypt_vector(public, x)
    size = sum(len(b) for b in blobs)
    got = np.concatenate([secret.decrypt(b, preset.params_per_ciphertext) for b in blobs])[:d]
    row: dict[str, Any] = {
        "security_argument": preset.security_argument(),
        "poly_modulus_degree": preset.poly_modulus_degree,
        "coeff_modulus_bits": list(preset.coeff_modulus_bits),
        "scale_bits": preset.scale_bits,
        "depth": preset.depth,
        "params_per_ciphertext": preset.params_per_ciphertext,
        "client_context_bytes": len(secret.client_context_bytes()),
        "server_context_bytes": len(secret.server_context_bytes()),
        "client_encrypt_s_per_client_per_1e6": ours * 1e6 / d,
        "client_encrypt_mparams_per_s": d / ours / 1e6,
        "bytes_per_param": size / d,
        "expansion_vs_float32": size / (4 * d),
        "unflooded_max_error": float(np.abs(got - x).max()),
    }
    started = time.perf_counter()
    ckks.PublicContext(preset, secret.server_context_bytes())
    row["server_context_load_s"] = time.perf_counter() - started
    if baseline:
        naive_ctx = ckks.naive_tenseal_context(preset)
        naive = median(time_repeats(lambda: ckks.naive_encrypt(naive_ctx, x, preset), repeats))
        naive_blobs = ckks.naive_encrypt(naive_ctx, x, preset)
        row.update(
            naive_client_encrypt_s_per_client_per_1e6=naive * 1e6 / d,
            naive_client_encrypt_mparams_per_s=d / naive / 1e6,
            naive_expansion_vs_float32=sum(len(b) for b in naive_blobs) / (4 * d),
            client_encrypt_speedup_vs_naive=naive / ours,
        )
    return row


def _server_figures(d: int, clients: int, repeats: int) -> dict[str, Any]:
    preset = ckks.AGGREGATION
    secret = ckks.SecretContext(preset)
    public = secret.public
    naive_ctx = ckks.naive_tenseal_context(preset)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-CLIP, CLIP, d) for _ in range(clients)]
    # what the server receives: each client's framed, signed ``ciphertexts`` field
    ours_in = [frame_blobs(ckks.encrypt_vector(public, x)) for x in xs]
    naive_in = [ckks.naive_encrypt(naive_ctx, x, preset) for x in xs]
    weights = [int(w) for w in rng.integers(10, 400, clients)]
    total = ckks.weighted_sum_framed(public, ours_in, weights)  # also the warm-up
    ours_times: list[float] = []
    naive_times: list[float] = []
    for _ in range(repeats):  # interleaved: both paths see the same load
        ours_times += time_repeats(
            lambda: ckks.weighted_sum_framed(public, ours_in, weights), 1, warmup=0
        )
        naive_times += time_repeats(lambda: ckks.naive_sum(naive_ctx, naive_in), 1, warmup=0)
    ours, naive = median(ours_times), median(naive_times)
    got = np.concatenate([secret.decrypt(ct, preset.params_per_ciphertext) for ct in total])
    got = got[:d]
    expected = sum(w * x for w, x in zip(weights, xs, strict=True))
    return {
        "server_clients": clients,
        "server_d": d,
        "server_s_per_client_per_1e6": ours / clients * 1e6 / d,
        "server_mparams_per_s": clients * d / ours / 1e6,
        "naive_server_s_per_client_per_1e6": naive / clients * 1e6 / d,
        "naive_server_mparams_per_s": clients * d / naive / 1e6,
        "server_ratio_vs_naive": ours / naive,
        "server_ratio_vs_naive_per_repeat": [
            a / b for a, b in zip(ours_times, naive_times, strict=True)
        ],
        "unflooded_sum_max_error": float(np.abs(got - expected).max()),
    }


def _flooded_error(d: int, n: int) -> dict[str, Any]:
    """The full decryptor path: n signed updates spanning ±C, one flooded release."""
    preset = ckks.AGGREGATION
    rng = np.random.default_rng(2)
    identities = {i: SigningKey.generate() for i in range(n)}
    with tempfile.TemporaryDirectory() as tmp:
        events = EventLog(Path(tmp) / "events.jsonl")
        decryptor = Decryptor(
            preset,
            DecryptorPolicy(
                min_cohort=3,
                max_weight_share=0.5,
                clip_range=CLIP,
                statistical_bits=BITS,
                query_budget=BUDGET,
            ),
            client_keys={i: k.public_bytes() for i, k in identities.items()},
            randomness=Randomness("os", 0),
            events=events,
        )
        reply = decode_message(decryptor.handle(ContextRequest(0, "client").to_bytes()))
        if not isinstance(reply, ContextReply):
            raise BenchmarkError(f"decryptor gave no context: {reply}")
        public = ckks.PublicContext(preset, reply.context)
        xs = rng.uniform(-CLIP, CLIP, (n, d))
        xs[:, 0], xs[:, 1] = CLIP, -CLIP
        weights = [int(w) for w in rng.integers(10, 400, n)]
        model_hash = hashlib.sha256(b"bench").digest()
        updates = [
            encrypt_update(
                public,
                identities[i],
                xs[i],
                round_index=1,
                attempt=0,
                client_id=i,
                epoch=0,
                model_hash=model_hash,
                num_samples=weights[i],
            )
            for i in range(n)
        ]
        digest = ckks.aggregate_digest(
            ckks.weighted_sum_framed(public, [u.ciphertexts for u in updates], weights)
        )
        request = SumRequest(
            round=1,
            attempt=0,
            epoch=0,
            updates=frame_blobs([u.to_bytes() for u in updates]),
            aggregate_digest=digest,
        )
        release = decode_message(decryptor.handle(request.to_bytes()))
        events.close()
    if not isinstance(release, SumRelease):
        raise BenchmarkError(f"decryptor refused the benchmark sum: {release}")
    expected = (np.array(weights, dtype=np.float64)[:, None] * xs).sum(0) / sum(weights)
    error = float(np.abs(release.mean.astype(np.float64) - expected).max())
    plan = decryptor.plan
    return {
        "error_n": n,
        "error_d": d,
        "max_aggregate_error": error,
        "max_aggregate_error_over_C": error / CLIP,
        "stated_bound": plan.mean_bound,
        "noise_sigma_on_mean": plan.mean_sigma,
        "fresh_error_bound": plan.fresh_error,
        "statistical_bits": plan.statistical_bits,
        "query_budget": plan.query_budget,
    }


@register_benchmark("ckks", "CKKS client encryption and server aggregation vs TenSEAL")
def bench_ckks(settings: BenchSettings) -> dict[str, Any]:
    d = 20_000 if settings.smoke else 1_000_000
    # 20 clients: the aggregate's serialisation (once per ciphertext index) is amortised as
    # in a real round; per-client figures are reported either way.
    server_clients = 3 if settings.smoke else 20
    err_d, err_n = (4_096, 20) if settings.smoke else (16_384, 100)
    repeats = settings.repeats
    aggregation = _client_figures(ckks.AGGREGATION, d, repeats, baseline=True)
    trust = _client_figures(ckks.TRUST, d, max(1, repeats // 3), baseline=False)
    for name, preset in (("aggregation", ckks.AGGREGATION), ("trust", ckks.TRUST)):
        row = aggregation if name == "aggregation" else trust
        row["scalar_noise_sigma_norm_at_d"] = ckks.scalar_flooding_sigma(
            preset, statistical_bits=BITS, query_budget=BUDGET, sensitivity=2.0 * CLIP * d**0.5
        )
        row["scalar_noise_sigma_norm_at_digits_mlp"] = ckks.scalar_flooding_sigma(
            preset, statistical_bits=BITS, query_budget=BUDGET, sensitivity=2.0 * CLIP * 17226**0.5
        )
    server = _server_figures(d, server_clients, repeats)
    error = _flooded_error(err_d, err_n)
    aggregation.update(server)
    aggregation.update(error)
    return {
        "client_encrypt_speedup_vs_naive": aggregation["client_encrypt_speedup_vs_naive"],
        "server_ratio_vs_naive": server["server_ratio_vs_naive"],
        "expansion_vs_float32": aggregation["expansion_vs_float32"],
        "max_aggregate_error_over_C": error["max_aggregate_error_over_C"],
        "flooding_statistical_bits": error["statistical_bits"],
        "flooding_query_budget": error["query_budget"],
        "d": d,
        "n_error": err_n,
        "note": "shared 2-core machine; baselines measured in the same run",
        "by_preset": {"aggregation": aggregation, "trust": trust},
    }
