"""SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020): the server learns the sum of the sites'
quantised updates, not any one of them, and survives sites that drop out after sharing keys.

Here every site of the round is every other's neighbour (SecAgg+ with k = n - 1, i.e. SecAgg):
with the 3-20 hospitals of a study the log-degree graph of SecAgg+ saves nothing. One federated
round takes four exchanges; all arithmetic is on uint64 vectors modulo 2^64 (numpy wraps):

1. ``keys``: each site makes two X25519 key pairs (one to encrypt shares, one for pairwise masks)
   and a 32-byte self-mask seed b, and sends both public keys and SHA-256(b) (a commitment the
   server checks b against when it rebuilds it: a site that sent a bad share is caught there).
2. ``shares``: each site Shamir-shares (t of n) its mask private key and b (Flower's
   ``create_shares``, pycryptodome's Shamir over GF(2^128)), and encrypts share j for site j with
   AES-GCM under HKDF(X25519(own enc key, j's enc public key)); the server only forwards them.
3. ``mask``: each site trains and sends y_u = x_u + PRG(b_u) + sum_v s(u, v) PRG(k_uv) mod 2^64,
   with x_u its quantised weighted update (:class:`Quantiser`), k_uv = HKDF(X25519(mask keys)) the
   key it shares with v, s(u, v) = +1 if u < v else -1 (site names order them); PRG = AES-256-CTR.
4. ``unmask``: each survivor opens the shares it holds: of b for every site whose y arrived, of the
   mask private key for every site whose y did not (never both for one site: the site refuses, and
   2t > n means two sets of t answers always share an honest site). The server rebuilds them from
   t shares and subtracts the masks: what is left is sum_u x_u.

The server never holds a site's x_u: y_u alone is x_u plus a uniform mask, and b_u is rebuilt only
for sites whose y_u is already in the sum. It does learn who took part, the sum, its total weight
and the timing. A site can still send any x_u it likes: secure aggregation hides inputs, it does
not check them (see README, "Secure aggregation").
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # X25519 keys, the seed, the derived keys
DTYPE = np.uint64  # the field: integers modulo 2^64


class SecAggError(ValueError):
    """The protocol cannot go on (too few sites, a bad key, share or vector); the text says why."""


# ---------------------------------------------------------------------- quantisation
@dataclass(frozen=True)
class Quantiser:
    """A site's update delta (float, one flat vector) as integers: each coordinate clipped to
    [-clip, clip] and rounded to the nearest of 2^bits levels, k in [0, 2^bits - 1]. The site sends
    x = [n, n k_1, ..., n k_D] for its n examples, so the sum is [N, sum n k] and
    :meth:`decode` gives the example-weighted mean delta within :attr:`bound` of the exact one,
    per coordinate, for deltas inside the clip range. Needs N (2^bits - 1) < 2^64."""

    clip: float
    bits: int

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def step(self) -> float:
        return 2 * self.clip / self.levels

    @property
    def bound(self) -> float:
        """The largest error of the decoded weighted mean, per coordinate (half a step)."""
        return self.step / 2

    def max_weight(self) -> int:
        """The largest total weight N whose sum cannot wrap around 2^64."""
        return (2**64 - 1) // self.levels

    def encode(self, delta: np.ndarray, weight: int) -> tuple[np.ndarray, int]:
        """(x as uint64 of length 1 + D, how many coordinates were clipped)."""
        if not 1 <= weight <= self.max_weight():
            raise SecAggError(f"weight {weight} outside [1, {self.max_weight()}]")
        delta = np.asarray(delta, dtype=np.float64).ravel()
        clipped = int(np.count_nonzero(np.abs(delta) > self.clip))
        k = np.rint((np.clip(delta, -self.clip, self.clip) + self.clip) / self.step).astype(DTYPE)
        return np.concatenate([np.array([weight], DTYPE), k * DTYPE(weight)]), clipped

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """(the weighted mean delta, float64 of length D; the total weight N) of a sum of encodings.
        SecAggError when the sum cannot be one: N = 0, or a coordinate above N (2^bits - 1)."""
        weight = int(total[0])
        if weight < 1 or weight > self.max_weight():
            raise SecAggError(f"the sum's total weight {weight} is not a sum of site weights")
        values = total[1:]
        if values.size and int(values.max()) > weight * self.levels:
            raise SecAggError(f"the sum holds a coordinate above total weight x {self.levels}: some site sent a "
                              f"vector that is not an encoded update (or the masks did not cancel)")
        # the integer division first, in exact integer arithmetic for the quotient, keeps float64 exact
        quotient, remainder = np.divmod(values, DTYPE(weight))
        mean_k = quotient.astype(np.float64) + remainder.astype(np.float64) / weight
        return mean_k * self.step - self.clip, weight


# ---------------------------------------------------------------------- primitives (cryptography)
def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keypair() -> tuple[bytes, bytes]:
    """(private, public) X25519 key, raw 32 bytes each."""
    private = X25519PrivateKey.generate()
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption()), _raw(private.public_key())


def public_of(private: bytes) -> bytes:
    return _raw(X25519PrivateKey.from_private_bytes(private).public_key())


def _kdf(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info.encode()).derive(secret)


def _agree(private: bytes, public: bytes, info: str) -> bytes:
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # a wrong length, or a low-order point (the all-zero shared secret)
        raise SecAggError(f"bad public key: {e}") from None
    return _kdf(shared, info)


def prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint64 from AES-256-CTR under ``key`` (each key is used for one vector)."""
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(DTYPE)


def commitment(seed: bytes) -> bytes:
    return hashlib.sha256(seed).digest()


def _pair_info(round_: int, a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"medgen-secagg/mask/{round_}/{len(lo)}:{lo}/{hi}"


def _sign(me: str, peer: str) -> int:
    return 1 if me < peer else -1


# ---------------------------------------------------------------------- the site's steps
@dataclass(frozen=True)
class SiteKeys:
    """A site's secrets for one round (kept at the site) and what it publishes of them."""

    enc_private: bytes
    mask_private: bytes
    seed: bytes

    @classmethod
    def new(cls) -> SiteKeys:
        return cls(keypair()[0], keypair()[0], os.urandom(KEY_BYTES))

    def public(self) -> list[bytes]:
        """[encryption public key, mask public key, SHA-256 of the seed]: stage 1's reply."""
        return [public_of(self.enc_private), public_of(self.mask_private), commitment(self.seed)]


def check_public(keys: dict[str, list[bytes]]) -> None:
    """SecAggError unless every site sent two 32-byte keys and a 32-byte hash, none shared."""
    for site, value in keys.items():
        if len(value) != 3 or any(not isinstance(v, bytes) or len(v) != KEY_BYTES for v in value):
            raise SecAggError(f"site {site}: public keys are not 3 x 32 bytes")
    flat = [v for value in keys.values() for v in value[:2]]
    if len(set(flat)) != len(flat):
        raise SecAggError("two sites sent the same public key")


def check_threshold(threshold: int, n: int) -> None:
    """What every site checks before it shares anything: 2 <= t <= n and 2t > n."""
    if not 2 <= threshold <= n or 2 * threshold <= n:
        raise SecAggError(f"threshold {threshold} for {n} sites: need 2 <= t <= n and 2t > n (a majority)")


def _aad(round_: int, owner: str, holder: str) -> bytes:
    return f"medgen-secagg/share/{round_}/{len(owner)}:{owner}/{holder}".encode()


def share_keys(me: str, keys: SiteKeys, round_: int, public: dict[str, list[bytes]],
               threshold: int) -> dict[str, bytes]:
    """Stage 2: {holder: AES-GCM ciphertext of (my seed share, my mask-key share)} for every site of
    ``public`` (sites in the order their Shamir index follows; mine included: I keep it)."""
    from medgen._compat.flwr import create_shares

    check_public(public)
    check_threshold(threshold, len(public))
    if me not in public or public[me] != keys.public():
        raise SecAggError(f"site {me}: the server's key list does not hold this site's own keys")
    seed_shares = create_shares(keys.seed, threshold, len(public))
    key_shares = create_shares(keys.mask_private, threshold, len(public))
    out = {}
    for holder, seed_share, key_share in zip(public, seed_shares, key_shares):
        key = _agree(keys.enc_private, public[holder][0], "medgen-secagg/enc")
        plain = struct.pack("<I", len(seed_share)) + seed_share + key_share
        nonce = os.urandom(12)
        out[holder] = nonce + AESGCM(key).encrypt(nonce, plain, _aad(round_, me, holder))
    return out


def mask(me: str, keys: SiteKeys, round_: int, x: np.ndarray, public: dict[str, list[bytes]]) -> np.ndarray:
    """Stage 3: x + PRG(seed) + sum over the other sites v of ``public`` of s(me, v) PRG(k_me,v)."""
    y = x.astype(DTYPE) + prg(_kdf(keys.seed, f"medgen-secagg/self/{round_}"), x.size)
    for peer, (_, mask_public, _) in public.items():
        if peer == me:
            continue
        stream = prg(_agree(keys.mask_private, mask_public, _pair_info(round_, me, peer)), x.size)
        y = y + stream if _sign(me, peer) > 0 else y - stream
    return y


def open_shares(me: str, keys: SiteKeys, round_: int, public: dict[str, list[bytes]], held: dict[str, bytes],
                survivors: list[str], dropped: list[str], threshold: int) -> dict[str, bytes]:
    """Stage 4: {owner: its seed share if it survived, its mask-key share if it dropped}, decrypted
    from the ciphertexts this site holds (``held``: owner -> ciphertext, its own included).
    SecAggError if the request could unmask someone: a site in both lists, sites missing,
    fewer than t survivors, or this site among the dropped."""
    survivors_, dropped_ = set(survivors), set(dropped)
    if survivors_ & dropped_:
        raise SecAggError(f"sites {sorted(survivors_ & dropped_)} are both survivors and dropped: refused")
    if survivors_ | dropped_ != set(public) or len(survivors) + len(dropped) != len(public):
        raise SecAggError("survivors and dropped sites are not exactly this round's sites: refused")
    if me not in survivors_:
        raise SecAggError(f"site {me} is listed as dropped: refused")
    if len(survivors) < threshold:
        raise SecAggError(f"{len(survivors)} survivors < threshold {threshold}: refused (the sum would not hide "
                          f"fewer sites' updates)")
    out = {}
    for owner in public:
        if owner not in held:
            raise SecAggError(f"site {me} holds no share from site {owner}")
        key = _agree(keys.enc_private, public[owner][0], "medgen-secagg/enc")
        blob = held[owner]
        try:
            plain = AESGCM(key).decrypt(blob[:12], blob[12:], _aad(round_, owner, me))
        except (InvalidTag, ValueError):
            raise SecAggError(f"the share from site {owner} does not decrypt (tampered, or not for this site and "
                              f"round)") from None
        n = struct.unpack("<I", plain[:4])[0]
        out[owner] = plain[4: 4 + n] if owner in survivors_ else plain[4 + n:]
    return out


# ---------------------------------------------------------------------- the server's step
def _rebuild(owner: str, shares: list[bytes], threshold: int, what: str) -> bytes:
    from medgen._compat.flwr import combine_shares

    if len(shares) < threshold:
        raise SecAggError(f"only {len(shares)} shares of site {owner}'s {what} (threshold {threshold})")
    try:
        return combine_shares(shares[:threshold])
    except (ValueError, IndexError) as e:
        raise SecAggError(f"site {owner}'s {what} cannot be rebuilt from its shares ({e})") from None


def unmask(round_: int, public: dict[str, list[bytes]], masked: dict[str, np.ndarray],
           opened: dict[str, dict[str, bytes]], threshold: int) -> np.ndarray:
    """Stage 4 at the server: sum_u x_u over the sites of ``masked`` (the survivors), from their
    masked vectors and the shares the answering survivors opened (``opened``: answerer -> owner ->
    share). Every other site of ``public`` dropped: its pairwise masks are removed with its rebuilt
    mask key. SecAggError (naming the site) when too few answered or a rebuilt secret does not
    match what its site published in stage 1."""
    if len(opened) < threshold:
        raise SecAggError(f"{len(opened)} sites opened their shares < threshold {threshold}")
    dropped = [s for s in public if s not in masked]
    total = sum(masked.values(), np.zeros(next(iter(masked.values())).size, DTYPE))
    for owner in public:
        shares = [answer[owner] for answer in opened.values() if owner in answer]
        if owner in masked:
            seed = _rebuild(owner, shares, threshold, "self-mask seed")
            if commitment(seed) != public[owner][2]:
                raise SecAggError(f"site {owner}'s rebuilt self-mask seed does not match its commitment: a site "
                                  f"sent a bad share")
            total = total - prg(_kdf(seed, f"medgen-secagg/self/{round_}"), total.size)
    for owner in dropped:
        shares = [answer[owner] for answer in opened.values() if owner in answer]
        private = _rebuild(owner, shares, threshold, "mask key")
        if len(private) != KEY_BYTES or public_of(private) != public[owner][1]:
            raise SecAggError(f"site {owner}'s rebuilt mask key does not match its public key: a site sent a bad "
                              f"share")
        for survivor in masked:
            stream = prg(_agree(private, public[survivor][1], _pair_info(round_, survivor, owner)), total.size)
            # the survivor added s(survivor, owner) PRG(k): take it away
            total = total - stream if _sign(survivor, owner) > 0 else total + stream
    return total
