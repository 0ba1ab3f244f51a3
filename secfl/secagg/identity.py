"""Pinned identity keys: who may speak for which client id.

Every client signs its advertised X25519 keys (and, at the consistency check, the survivor
set) with its Ed25519 identity key. Everybody checks those signatures against a registry of
*pinned* public keys obtained out of band (in deployment, from the federation's
certificates), never against keys the server relays. A server that substitutes a client's
advertised keys (to run a man-in-the-middle on the share encryption, Bonawitz et al. CCS
2017 §6.2) or its identity key is detected and the protocol aborts, naming the client.
"""

from __future__ import annotations

from collections.abc import Mapping

from secfl.crypto.sign import PUBLIC_KEY_BYTES, verify_signature
from secfl.errors import ConfigError, SecAggAbort, SignatureError


class IdentityRegistry:
    """Immutable map client id -> pinned Ed25519 public key."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        for client_id, key in keys.items():
            if len(key) != PUBLIC_KEY_BYTES:
                raise ConfigError(
                    f"identity key of client {client_id} must be {PUBLIC_KEY_BYTES} bytes, "
                    f"got {len(key)}"
                )
        self._keys = dict(keys)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._keys

    def public_key(self, client_id: int) -> bytes:
        key = self._keys.get(client_id)
        if key is None:
            raise SecAggAbort(f"client {client_id} has no pinned identity key in the registry")
        return key

    def verify(
        self, client_id: int, signature: bytes, context: bytes, message: bytes, *, what: str
    ) -> None:
        """Raise :class:`SecAggAbort` naming the client unless the signature verifies."""
        try:
            verify_signature(self.public_key(client_id), signature, context, message)
        except SignatureError:
            raise SecAggAbort(
                f"bad signature: {what} of client {client_id} does not verify against its "
                "pinned identity key (substituted key or forged message)"
            ) from None

    def replaced(self, client_id: int, key: bytes) -> IdentityRegistry:
        """A copy with one key replaced (tests model a substituted identity)."""
        return IdentityRegistry({**self._keys, client_id: key})
