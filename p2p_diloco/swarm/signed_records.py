"""Records signed by the peer they name: one identity for the transport, the groups and the DHT.

A peer's libp2p identity is an RSA key (hivemind's key file format); its peer id is the hash of the public key,
and libp2p proves it on every connection (group members, state donors). The records a peer publishes under its
own peer id — a DHT subkey that is a string: progress and state-hash records — carry that public key and a
signature over (key, subkey, value, expiration time). Every DHT node of ours (`SignedRecords`, installed by
`dht.start_dht`) signs its own such records when it stores them and checks everyone's before it stores or
returns them: a record whose public key does not hash to the peer id it is stored under, or whose signature
fails, is refused and logged once. So nobody can publish under another peer's id, overwrite another's record,
or replay an old one with a later expiration; a vote, a group member and a donor are one identity.
(hivemind's `RSASignatureValidator` protects subkeys that spell out a second, process-wide RSA key; binding
records to the peer id that libp2p authenticates needs no second key and no key in every subkey.)

The run config of an admission-only run is stored under a bytes subkey naming the run key
(`admission.config_subkey`) and must be signed by that key (`admission.open_run_config`): nobody can replace it.
Other records without a string subkey (the config of a run without a run key; hivemind's own matchmaking
records, whose subkeys are bytes) pass unchanged. What signatures do not stop: one operator starting many
identities (admission tokens for one peer id each do).
"""

from __future__ import annotations

import hashlib
import logging
import os

import msgpack
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from ..node.admission import RUN_KEY_SUBKEY, AdmissionError, open_run_config

log = logging.getLogger(__name__)

TAG = b"p2p-diloco-signed/1"
MAX_PUBLIC_KEY_BYTES = 1024  # DER of an RSA key up to 4096 bits is ~550 bytes
MAX_SIGNATURE_BYTES = 1024


def peer_id_of(public_der: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in DER (SubjectPublicKeyInfo)."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))).to_base58()


def load_identity(path: str) -> rsa.RSAPrivateKey:
    """The RSA private key of a libp2p key file (hivemind's format); ValueError for anything else."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        proto = crypto_pb2.PrivateKey.FromString(data)
        key = serialization.load_der_private_key(proto.data, password=None)
    except Exception as e:
        raise ValueError(f"{path}: not a libp2p private key file ({type(e).__name__})") from None
    if proto.key_type != crypto_pb2.RSA or not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path}: a libp2p key of another type than RSA")
    return key


def _signed_bytes(record: DHTRecord, value: bytes) -> bytes:
    return msgpack.packb([record.key, record.subkey, value, record.expiration_time], use_bin_type=True)


class SignedRecords(RecordValidatorBase):
    """hivemind record validator: string subkeys are peer ids, and their records must be signed by that peer.

    `identity_path`: this node's key file; read by `load` (or when the first record is signed), in the DHT's
    process, once the daemon has started (hivemind writes a new one then). None: this node signs nothing."""

    def __init__(self, identity_path: str | None = None, protected: dict[bytes, str] | None = None):
        """`protected`: DHT key ids (`protected_keys`) -> what they must hold: "peer records" (only records under
        a peer id: a plain value stored over them, with a later expiration, would wipe every peer's) or "run
        config" (only the config signed by a run key)."""
        self.identity_path = identity_path
        self.protected = protected or {}
        self._key: rsa.RSAPrivateKey | None = None
        self._peer_id: str | None = None
        self._public_der = b""
        self._logged: set[str] = set()

    def load(self) -> str | None:
        """Read the key file now (it may be deleted afterwards); this node's peer id (None: no key file)."""
        identity = self._identity()
        return None if identity is None else identity[1]

    def _identity(self) -> tuple[rsa.RSAPrivateKey, str] | None:
        if self._key is None and self.identity_path and os.path.exists(self.identity_path):
            self._key = load_identity(self.identity_path)
            self._public_der = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
            self._peer_id = peer_id_of(self._public_der)
        return None if self._key is None else (self._key, self._peer_id)

    @staticmethod
    def _subkey(record: DHTRecord) -> str | None:
        try:
            subkey = msgpack.unpackb(record.subkey, raw=False) if record.subkey else None
        except Exception:
            return None
        return subkey if isinstance(subkey, str) else None

    def sign_value(self, record: DHTRecord) -> bytes:
        subkey = self._subkey(record)
        identity = self._identity() if subkey is not None else None
        if identity is None or subkey != identity[1]:
            return record.value  # not ours to sign: it will not validate anywhere
        signature = identity[0].sign(_signed_bytes(record, record.value), padding.PKCS1v15(), hashes.SHA256())
        return msgpack.packb([TAG, record.value, self._public_der, signature], use_bin_type=True)

    def strip_value(self, record: DHTRecord) -> bytes:
        if self._subkey(record) is None:
            return record.value
        opened = _open(record.value)
        return record.value if opened is None else opened[0]

    def validate(self, record: DHTRecord) -> bool:
        subkey = self._subkey(record)
        if subkey is None:
            guarded = self.protected.get(record.key)
            if guarded is not None and not self._run_key_subkey(record):
                if guarded not in self._logged:
                    self._logged.add(guarded)
                    log.warning("refusing a record over the run's %s that is not one (logged once)", guarded)
                return False
            return self._valid_run_config(record)
        if self.protected.get(record.key) == "run config":
            return False
        problem = self.problem(record, subkey)
        if problem is not None and subkey not in self._logged:
            self._logged.add(subkey)
            log.warning("refusing a record stored under peer %s: %s (logged once per peer id)", subkey, problem)
        return problem is None

    @staticmethod
    def _run_key_subkey(record: DHTRecord) -> bytes | None:
        try:
            subkey = msgpack.unpackb(record.subkey, raw=False) if record.subkey else None
        except Exception:
            return None
        return subkey if isinstance(subkey, bytes) and subkey.startswith(RUN_KEY_SUBKEY) else None

    def _valid_run_config(self, record: DHTRecord) -> bool:
        """A record under a run key's subkey must be that key's signed run config; any other passes."""
        subkey = self._run_key_subkey(record)
        if subkey is None:
            return self.protected.get(record.key) != "peer records"
        try:  # (the value as stored: our bytes, serialized by hivemind)
            value = msgpack.unpackb(record.value, raw=True, max_bin_len=64 * 1024) \
                if len(record.value) <= 64 * 1024 + 8 else None
            open_run_config(value, subkey[len(RUN_KEY_SUBKEY):])
        except (AdmissionError, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            if "run-config" not in self._logged:
                self._logged.add("run-config")
                log.warning("refusing a run config record: %s (logged once)", e)
            return False
        return True

    @staticmethod
    def problem(record: DHTRecord, subkey: str) -> str | None:
        """Why the record under `subkey` is not that peer's, in words; None: it is."""
        opened = _open(record.value)
        if opened is None:
            return "not signed"
        value, public_der, signature = opened
        try:
            public_key = serialization.load_der_public_key(public_der)
        except Exception:
            return "its public key does not parse"
        if not isinstance(public_key, rsa.RSAPublicKey):
            return "its public key is not RSA"
        if peer_id_of(public_der) != subkey:
            return f"signed by another peer ({peer_id_of(public_der)})"
        try:
            public_key.verify(signature, _signed_bytes(record, value), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return "its signature does not match (forged, altered or replayed with another expiration)"
        return None

    @property
    def priority(self) -> int:
        return 10  # outermost: the signature covers what the other validators made of the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def protected_keys(run_id: str | None, admission_only: bool, fragments: int = 64) -> dict[bytes, str]:
    """The DHT key ids of run `run_id`'s records (`SignedRecords.protected`): progress and state-hash records
    (of up to `fragments` fragments), and, in an admission-only run, the run config."""
    if not run_id:
        return {}
    keys = {f"{run_id}_progress": "peer records",
            **{f"{run_id}_f{k}_hashes": "peer records" for k in range(fragments)}}
    if admission_only:
        keys[f"{run_id}_config"] = "run config"
    return {DHTID.generate(source=key).to_bytes(): what for key, what in keys.items()}


def _open(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(value, public key DER, signature) of a signed value, None for anything else (bounded before parsing)."""
    if not isinstance(value, bytes) or len(value) > 64 * 1024:
        return None
    try:
        tag, inner, public_der, signature = msgpack.unpackb(value, raw=True, max_bin_len=64 * 1024,
                                                           max_array_len=4)
    except Exception:
        return None
    if tag != TAG or not all(isinstance(x, bytes) for x in (inner, public_der, signature)) \
            or len(public_der) > MAX_PUBLIC_KEY_BYTES or len(signature) > MAX_SIGNATURE_BYTES:
        return None
    return inner, public_der, signature
