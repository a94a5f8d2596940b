"""Admission to a run: the run key, join tokens, and the run config signed by the run key.

A host that passes `--run-key FILE` makes its run admission-only. The run key is an Ed25519 key (created on
first use, kept in FILE as PKCS#8 PEM, mode 0600). Its public half travels in the run config (`RunConfig.run_key`)
and in every token, and the run config is published signed by it (`sign_run_config`), under a DHT subkey that
names the key: a record of the run config that the key did not sign is refused by every DHT node, so nobody can
replace the run's config, only publish another run under another key, which no token names.

A join token (`p2p-diloco admit`) is the host's signature over (run id, run key, peer id or "anyone", expiry, a
token id). Trainers pass it to `join --token`; it goes into their progress records and their round metadata,
and every peer checks every other peer's (`Admission.problem`) before it lets that peer into a group, serves it
state, downloads state from it, or counts its state hash as a vote. A token for one peer id holds only for that
identity (`join --identity FILE` keeps one across restarts; `p2p-diloco identity FILE` prints it); a token for
anyone admits every identity that presents it until it expires (one operator can then start many identities:
give such tokens out with care, and short expiries), unless it is limited to N seats (`admit --seats N`): such a
token admits nobody by itself; each trainer redeems it at the host for a token of its own peer id while a seat is
free (`node.seat_ledger`, `swarm.seats`).

This module needs no network: it is used by the CLI (keys, tokens), by the records (config signatures) and by
the swarm (checks), in whichever process.
"""

from __future__ import annotations

import base64
import math
import os
import secrets
import time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

TOKEN_PREFIX = "p2pd-token-1."
CONFIG_TAG = b"p2p-diloco-run-config/1"
TOKEN_TAG = b"p2p-diloco-token/1"
MAX_TOKEN_CHARS = 1024  # a token is ~250 characters; anything longer is refused before it is decoded
MAX_PEER_ID_CHARS = 128
CACHE_SIZE = 4096  # checked (token, peer) pairs an `Admission` remembers
MAX_SEATS = 100_000  # identities one limited open token may admit


class AdmissionError(ValueError):
    """A run key, token or signed run config that cannot be used; the message names the problem."""


class RunKey:
    """The host's Ed25519 key: signs the run config and join tokens."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def load_or_create(cls, path: str) -> tuple["RunKey", bool]:
        """The key in `path`, or a new one written there (mode 0600); (key, created)."""
        if os.path.exists(path):
            return cls.load(path), False
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise AdmissionError(f"--run-key {path}: cannot create it ({e.strerror or e})") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(key), True

    @classmethod
    def load(cls, path: str) -> "RunKey":
        try:
            with open(path, "rb") as f:
                data = f.read(64 * 1024)
        except OSError as e:
            raise AdmissionError(f"--run-key {path}: cannot read it ({e.strerror or e})") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except Exception:
            raise AdmissionError(f"--run-key {path}: not a PEM private key (a run key file that "
                                 "`p2p-diloco host --run-key` created)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AdmissionError(f"--run-key {path}: a {type(key).__name__}, not an Ed25519 run key")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def issue(self, run_id: str, peer: str | None, valid_for_s: float, now: float | None = None,
              seats: int = 0) -> str:
        """A join token for `peer` (None: anyone who presents it) valid `valid_for_s` seconds from `now`.
        `seats` > 0: an open token for at most that many identities, each redeemed at the host for a token of
        its own (`swarm.seats`); such a token admits nobody by itself."""
        if not math.isfinite(valid_for_s) or valid_for_s <= 0:
            raise AdmissionError(f"a token must be valid for a positive, finite time, not {valid_for_s!r} s")
        if not isinstance(seats, int) or not 0 <= seats <= MAX_SEATS:
            raise AdmissionError(f"a token's seats must be a whole number from 1 to {MAX_SEATS}, not {seats!r}")
        if seats and peer:
            raise AdmissionError("a token for one peer id has one seat: limit only tokens for anyone")
        body = [run_id, self.public, peer or "", float((time.time() if now is None else now) + valid_for_s),
                secrets.token_bytes(8)] + ([seats] if seats else [])
        packed = msgpack.packb(body, use_bin_type=True)
        signature = self.sign(TOKEN_TAG + packed)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(msgpack.packb([packed, signature])).decode().rstrip("=")


@dataclass(frozen=True)
class Token:
    """A join token, its signature checked against the run key it names."""

    run_id: str
    run_key: bytes  # the run's public key (32 bytes)
    peer: str  # "" : anyone who presents it
    expires: float  # seconds since the epoch
    token_id: bytes
    seats: int = 0  # > 0: for anyone, at most this many identities, each redeemed at the host (`swarm.seats`)

    @classmethod
    def parse(cls, text: str) -> "Token":
        """Raises AdmissionError naming what is wrong with `text`."""
        if not isinstance(text, str) or not text:
            raise AdmissionError("no token")
        if len(text) > MAX_TOKEN_CHARS:
            raise AdmissionError(f"a token of {len(text)} characters (at most {MAX_TOKEN_CHARS})")
        if not text.startswith(TOKEN_PREFIX):
            raise AdmissionError(f"not a join token (they start with {TOKEN_PREFIX!r}: copy it whole from what "
                                 "`p2p-diloco admit` printed)")
        try:
            body = text[len(TOKEN_PREFIX):]
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            packed, signature = msgpack.unpackb(raw, raw=True, max_bin_len=MAX_TOKEN_CHARS, max_array_len=2)
            fields = msgpack.unpackb(packed, raw=False, max_bin_len=MAX_TOKEN_CHARS, max_str_len=MAX_TOKEN_CHARS,
                                     max_array_len=6)
            run_id, run_key, peer, expires, token_id, *rest = fields
        except Exception:
            raise AdmissionError("a damaged token (it does not decode: copy it whole)") from None
        seats = rest[0] if len(rest) == 1 else None if rest else 0
        if not (isinstance(run_id, str) and isinstance(run_key, bytes) and len(run_key) == 32
                and isinstance(peer, str) and len(peer) <= MAX_PEER_ID_CHARS
                and isinstance(expires, float) and math.isfinite(expires)
                and isinstance(token_id, bytes) and isinstance(signature, bytes)
                and type(seats) is int and 0 <= seats <= MAX_SEATS and not (seats and peer)):
            raise AdmissionError("a damaged token (its fields have the wrong types)")
        try:
            Ed25519PublicKey.from_public_bytes(run_key).verify(signature, TOKEN_TAG + packed)
        except (InvalidSignature, ValueError):
            raise AdmissionError("a token whose signature does not match its run key (forged or altered)") from None
        return cls(run_id, run_key, peer, expires, token_id, seats)

    def problem(self, run_id: str, run_key: bytes, peer_id: str, now: float | None = None,
                redeeming: bool = False) -> str | None:
        """Why this token does not admit `peer_id` to run `run_id` of `run_key`, in words; None: it does.
        `redeeming`: whether it could be redeemed for a seat instead (the host's question)."""
        if self.run_id != run_id:
            return f"a token for run {self.run_id!r}, not {run_id!r}"
        if self.run_key != run_key:
            return "a token signed by another run key than this run's"
        if self.peer and self.peer != peer_id:
            return f"a token for peer {self.peer}, not {peer_id}"
        if (time.time() if now is None else now) > self.expires:
            return f"a token that expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.expires))}"
        if self.seats and not redeeming:
            return (f"a token for {self.seats} seats, which admits only after it is redeemed at the host for a "
                    "token of the peer's own")
        if redeeming and not self.seats:
            return "a token without seats (it admits its holder as it is: nothing to redeem)"
        return None

    def describe(self) -> str:
        who = f"peer {self.peer}" if self.peer else "anyone who presents it"
        if self.seats:
            who = f"up to {self.seats} identities (seats, each redeemed at the host)"
        return (f"run {self.run_id!r}, {who}, valid until "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.expires))}")


class Admission:
    """Who may take part in one run: the peers whose token, signed by the run key, admits their peer id now."""

    def __init__(self, run_id: str, run_key: bytes):
        self.run_id, self.run_key = run_id, run_key
        self._checked: dict[tuple[str, str], tuple[str | None, float]] = {}  # (token, peer) -> (problem, expires)

    def problem(self, token: object, peer_id: str, now: float | None = None) -> str | None:
        """Why `token` (as a peer presented it: anything) does not admit `peer_id`; None: it does."""
        if not isinstance(token, str) or not token:
            return "no token"
        now = time.time() if now is None else now
        known = self._checked.get((token, peer_id))
        if known is not None:
            problem, expires = known
            return problem if problem is not None or now <= expires else self._expired(expires)
        try:
            parsed = Token.parse(token)
            problem, expires = parsed.problem(self.run_id, self.run_key, peer_id, now), parsed.expires
        except AdmissionError as e:
            problem, expires = str(e), 0.0
        if len(self._checked) >= CACHE_SIZE:
            self._checked.clear()
        self._checked[(token, peer_id)] = (problem, expires)
        return problem

    @staticmethod
    def _expired(expires: float) -> str:
        return f"a token that expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}"


def sign_run_config(config: bytes, key: RunKey) -> bytes:
    """The run config record as published: the encoded config and the run key's signature over it."""
    return msgpack.packb([CONFIG_TAG, config, key.sign(CONFIG_TAG + config)], use_bin_type=True)


def open_run_config(record: object, run_key: bytes) -> bytes:
    """The encoded config in a signed run config record, checked against `run_key`; AdmissionError otherwise."""
    if not isinstance(record, (bytes, bytearray)) or len(record) > 64 * 1024:
        raise AdmissionError("the run config record is not a signed config")
    try:
        tag, config, signature = msgpack.unpackb(bytes(record), raw=True, max_array_len=3)
    except Exception:
        raise AdmissionError("the run config record is not a signed config") from None
    if tag != CONFIG_TAG or not isinstance(config, bytes) or not isinstance(signature, bytes):
        raise AdmissionError("the run config record is not a signed config")
    try:
        Ed25519PublicKey.from_public_bytes(run_key).verify(signature, CONFIG_TAG + config)
    except (InvalidSignature, ValueError):
        raise AdmissionError("the run config is not signed by the run key (forged or altered)") from None
    return config


RUN_KEY_SUBKEY = b"run-key:"  # the run config's DHT subkey: this prefix and the run's public key


def config_subkey(run_key: bytes) -> bytes:
    return RUN_KEY_SUBKEY + run_key
