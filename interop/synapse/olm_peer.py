"""interop/synapse/olm_peer.py: a minimal end-to-end-encryption client on raw
HTTP, for the Olm checks of check.py.

The cryptography is libolm's (the `python-olm` bindings pinned in
requirements.txt); this module only does what a Matrix client does around
it: it publishes an Olm account's identity keys as signed device keys,
signed one-time keys and a signed fallback key (`/keys/upload`), looks other
devices up (`/keys/query`) and verifies their self-signatures, claims a
one-time key (`/keys/claim`) and verifies its signature, opens an outbound
Olm session, sends `m.room.encrypted` to-device messages
(`m.olm.v1.curve25519-aes-sha2`) with `/sendToDevice`, and reads and
decrypts the ones `/sync` brings, checking the Olm payload's sender,
recipient and keys fields as the spec asks.

Signing follows the spec's "Signing JSON": canonical JSON of the object
without `signatures` and `unsigned`, signed by the device's Ed25519 key,
under `signatures[user_id]["ed25519:<device_id>"]`.

It imports nothing from check.py: the caller hands it a `request` function
(method, url, body, token) -> parsed JSON of a 200 answer, raising on
anything else, and an `error` exception class for what it finds wrong.
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
from typing import Any, Callable

import canonicaljson
import olm

OLM_ALGORITHM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM_ALGORITHM = "m.megolm.v1.aes-sha2"
OTK_ALGORITHM = "signed_curve25519"

Request = Callable[[str, str, Any, str], Any]


def canonical(obj: Any) -> str:
    return canonicaljson.encode_canonical_json(obj).decode()


def verify_signed(obj: dict, user_id: str, device_id: str, ed25519_key: str, error: type) -> None:
    """Checks `obj`'s signature by user_id's device `device_id` (Ed25519 key
    `ed25519_key`), raising `error` if it is missing or wrong."""
    sig = ((obj.get("signatures") or {}).get(user_id) or {}).get(f"ed25519:{device_id}")
    if not isinstance(sig, str):
        raise error(f"no signature by {user_id}/{device_id} on {obj!r}")
    unsigned = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    try:
        olm.ed25519_verify(ed25519_key, canonical(unsigned), sig)
    except olm.OlmVerifyError as e:
        raise error(f"bad signature by {user_id}/{device_id} on {obj!r}: {e}") from e


class OlmPeer:
    """One device of one user with an Olm account, driven over the client API."""

    def __init__(self, request: Request, error: type, client_url: str, user_id: str,
                 device_id: str, token: str) -> None:
        self.request = request
        self.error = error
        self.client_url = client_url.rstrip("/")
        self.user_id = user_id
        self.device_id = device_id
        self.token = token
        self.account = olm.Account()
        keys = self.account.identity_keys
        self.curve25519: str = keys["curve25519"]
        self.ed25519: str = keys["ed25519"]
        self.fallback_keys: dict[str, dict] = {}  # the last uploaded, as uploaded
        self.since: str | None = None
        self.last_sync: dict = {}
        # Olm sessions by the peer's Curve25519 identity key, newest first.
        self.sessions: dict[str, list[olm.Session]] = {}
        # Devices we looked up: (user_id, device_id) -> device keys object.
        self.devices: dict[tuple[str, str], dict] = {}

    # ---- HTTP ---------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return self.request(method, f"{self.client_url}/_matrix/client/v3{path}", body, self.token)

    # ---- publishing keys ----------------------------------------------------

    def sign(self, obj: dict) -> dict:
        unsigned = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
        sig = self.account.sign(canonical(unsigned))
        signed = dict(obj)
        signed["signatures"] = {self.user_id: {f"ed25519:{self.device_id}": sig}}
        return signed

    def device_keys(self) -> dict:
        return self.sign({
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": [OLM_ALGORITHM, MEGOLM_ALGORITHM],
            "keys": {f"curve25519:{self.device_id}": self.curve25519,
                     f"ed25519:{self.device_id}": self.ed25519},
        })

    def upload_keys(self, one_time_keys: int, fallback: bool, with_device_keys: bool = True) -> dict:
        """POST /keys/upload: device keys (first time), `one_time_keys` new
        signed one-time keys and, if asked, a new signed fallback key. Returns
        `one_time_key_counts` and marks the keys published."""
        body: dict = {}
        if with_device_keys:
            body["device_keys"] = self.device_keys()
        if one_time_keys:
            self.account.generate_one_time_keys(one_time_keys)
            body["one_time_keys"] = {
                f"{OTK_ALGORITHM}:{key_id}": self.sign({"key": key})
                for key_id, key in self.account.one_time_keys["curve25519"].items()
            }
        if fallback:
            self.account.generate_fallback_key()
            body["fallback_keys"] = {
                f"{OTK_ALGORITHM}:{key_id}": self.sign({"key": key, "fallback": True})
                for key_id, key in self.account.fallback_key["curve25519"].items()
            }
            self.fallback_keys = body["fallback_keys"]
        answer = self.api("POST", "/keys/upload", body)
        self.account.mark_keys_as_published()
        counts = answer.get("one_time_key_counts") if isinstance(answer, dict) else None
        if not isinstance(counts, dict):
            raise self.error(f"/keys/upload answered {answer!r}, no one_time_key_counts")
        return counts

    # ---- looking others up --------------------------------------------------

    def query(self, user_id: str) -> dict[str, dict]:
        """POST /keys/query for all of `user_id`'s devices; verifies each
        device's self-signature and IDs and remembers them. Returns
        device_id -> device keys (with `unsigned` as served)."""
        answer = self.api("POST", "/keys/query", {"device_keys": {user_id: []}, "timeout": 10000})
        if answer.get("failures"):
            raise self.error(f"/keys/query for {user_id} had failures: {answer['failures']!r}")
        devices = (answer.get("device_keys") or {}).get(user_id)
        if not isinstance(devices, dict) or not devices:
            raise self.error(f"/keys/query for {user_id} returned no devices: {answer!r}")
        for device_id, keys in devices.items():
            if keys.get("user_id") != user_id or keys.get("device_id") != device_id:
                raise self.error(f"device {device_id} of {user_id} names itself "
                                 f"{keys.get('user_id')}/{keys.get('device_id')}")
            ed = (keys.get("keys") or {}).get(f"ed25519:{device_id}")
            if not isinstance(ed, str):
                raise self.error(f"device {user_id}/{device_id} has no ed25519 key: {keys!r}")
            verify_signed(keys, user_id, device_id, ed, self.error)
            self.devices[(user_id, device_id)] = keys
        return devices

    def known(self, user_id: str, device_id: str) -> tuple[str, str]:
        """(curve25519, ed25519) of a device found by `query`."""
        keys = self.devices.get((user_id, device_id))
        if keys is None:
            raise self.error(f"{user_id}/{device_id} was not queried")
        k = keys["keys"]
        return k[f"curve25519:{device_id}"], k[f"ed25519:{device_id}"]

    def claim(self, user_id: str, device_id: str) -> tuple[str, dict]:
        """POST /keys/claim one signed_curve25519 key of a queried device;
        verifies the key's signature. Returns (key id, key object)."""
        answer = self.api("POST", "/keys/claim",
                          {"one_time_keys": {user_id: {device_id: OTK_ALGORITHM}}, "timeout": 10000})
        if answer.get("failures"):
            raise self.error(f"/keys/claim for {user_id}/{device_id} had failures: {answer['failures']!r}")
        got = ((answer.get("one_time_keys") or {}).get(user_id) or {}).get(device_id)
        if not isinstance(got, dict) or len(got) != 1:
            raise self.error(f"/keys/claim for {user_id}/{device_id} answered {answer!r}")
        key_id, key = next(iter(got.items()))
        if not key_id.startswith(f"{OTK_ALGORITHM}:") or not isinstance(key, dict) \
                or not isinstance(key.get("key"), str):
            raise self.error(f"claimed key {key_id!r}: {key!r} is not a signed_curve25519 key object")
        _, ed = self.known(user_id, device_id)
        verify_signed(key, user_id, device_id, ed, self.error)
        return key_id, key

    # ---- Olm ----------------------------------------------------------------

    def start_session(self, user_id: str, device_id: str, one_time_key: str) -> None:
        """An outbound Olm session to a queried device, on a claimed key."""
        curve, _ = self.known(user_id, device_id)
        session = olm.OutboundSession(self.account, curve, one_time_key)
        self.sessions.setdefault(curve, []).insert(0, session)

    def send_encrypted(self, user_id: str, device_id: str, ev_type: str, content: dict) -> int:
        """Encrypts `{type, content}` for one device with our newest session to
        it and sends it as m.room.encrypted. Returns the Olm message type."""
        curve, ed = self.known(user_id, device_id)
        sessions = self.sessions.get(curve)
        if not sessions:
            raise self.error(f"no Olm session with {user_id}/{device_id}")
        payload = {
            "type": ev_type,
            "content": content,
            "sender": self.user_id,
            "sender_device": self.device_id,
            "keys": {"ed25519": self.ed25519},
            "recipient": user_id,
            "recipient_keys": {"ed25519": ed},
        }
        msg = sessions[0].encrypt(json.dumps(payload))
        encrypted = {
            "algorithm": OLM_ALGORITHM,
            "sender_key": self.curve25519,
            "ciphertext": {curve: {"type": msg.message_type, "body": msg.ciphertext}},
        }
        txn = secrets.token_hex(8)
        answer = self.api("PUT", f"/sendToDevice/m.room.encrypted/{txn}",
                          {"messages": {user_id: {device_id: encrypted}}})
        if answer != {}:
            raise self.error(f"/sendToDevice answered {answer!r}")
        return msg.message_type

    def sync(self, timeout_ms: int) -> list[dict]:
        params = {"timeout": str(timeout_ms)}
        if self.since is not None:
            params["since"] = self.since
        url = f"{self.client_url}/_matrix/client/v3/sync?" + urllib.parse.urlencode(params)
        body = self.request("GET", url, None, self.token)
        if not isinstance(body, dict) or not isinstance(body.get("next_batch"), str):
            raise self.error(f"/sync without next_batch: {body!r}")
        self.since = body["next_batch"]
        self.last_sync = body
        return (body.get("to_device") or {}).get("events") or []

    def decrypt(self, event: dict) -> tuple[int, dict]:
        """Decrypts one m.room.encrypted to-device event for this device and
        checks the payload. Returns (Olm message type, payload)."""
        c = event.get("content") or {}
        if event.get("type") != "m.room.encrypted" or c.get("algorithm") != OLM_ALGORITHM:
            raise self.error(f"not an Olm event: {event!r}")
        sender_key = c.get("sender_key")
        mine = (c.get("ciphertext") or {}).get(self.curve25519)
        if not isinstance(sender_key, str) or not isinstance(mine, dict):
            raise self.error(f"no ciphertext for our key in {event!r}")
        msg_type, body = mine.get("type"), mine.get("body")
        if msg_type == 0:
            prekey = olm.OlmPreKeyMessage(body)
            for session in self.sessions.get(sender_key, []):
                if session.matches(prekey, sender_key):
                    plaintext = session.decrypt(prekey)
                    break
            else:
                session = olm.InboundSession(self.account, prekey, sender_key)
                # One-time keys are single use; the fallback key stays.
                self.account.remove_one_time_keys(session)
                plaintext = session.decrypt(prekey)
                self.sessions.setdefault(sender_key, []).insert(0, session)
        elif msg_type == 1:
            message = olm.OlmMessage(body)
            for session in self.sessions.get(sender_key, []):
                try:
                    plaintext = session.decrypt(message)
                    break
                except olm.OlmSessionError:
                    continue
            else:
                raise self.error(f"no session of ours decrypts the type-1 message from {sender_key}")
        else:
            raise self.error(f"Olm message type {msg_type!r}")
        payload = json.loads(plaintext)
        sender = event.get("sender")
        if payload.get("sender") != sender:
            raise self.error(f"payload sender {payload.get('sender')!r} is not the event's {sender!r}")
        if payload.get("recipient") != self.user_id or \
                (payload.get("recipient_keys") or {}).get("ed25519") != self.ed25519:
            raise self.error(f"payload not addressed to us: {payload!r}")
        device = payload.get("sender_device")
        known = self.devices.get((sender, device))
        if known is not None and (payload.get("keys") or {}).get("ed25519") != \
                known["keys"].get(f"ed25519:{device}"):
            raise self.error(f"payload keys {payload.get('keys')!r} are not {sender}/{device}'s")
        if known is not None and sender_key != known["keys"].get(f"curve25519:{device}"):
            raise self.error(f"sender_key {sender_key} is not {sender}/{device}'s")
        return msg_type, payload
