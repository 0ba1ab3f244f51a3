"""Encrypted aggregation with CKKS: three roles that talk only through messages.

* :mod:`secfl.he.decryptor` — the decryptor: generates the keys, holds the secret key, and
  releases only what its policy allows (weighted sums over a large enough, undominated cohort;
  at most four trust scalars per client per round), each release noise-flooded and logged.
* :mod:`secfl.he.client` — the client side: encrypt the clipped update under the public key,
  sign ciphertexts and weight.
* :mod:`secfl.he.server` — the server side: weighted sum of ciphertexts with plaintext
  (integer) weights, accumulated in place; asks the decryptor for the release.

:mod:`secfl.he.simulation` wires the three together for ``secfl run``; the protocol is
specified in ``protocols/ckks_aggregation.md``.
"""
