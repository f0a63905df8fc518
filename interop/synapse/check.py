#!/usr/bin/env python3
"""interop/synapse/check.py: send-to-device interop checks between two
homeservers on loopback, A (always Synapse) and B (Synapse or a Courier relay).

Prints one line per check, `PASS <name>` or `FAIL <name>: <reason>` (with
`INFO <name>: ...` lines for measurements and captured JSON), then exactly
`N passed, M failed`; exits 1 if any check failed.

Run it through run.sh, which starts the servers and passes all of this:

  check.py --work DIR --ca CA --tls-cert CRT --tls-key KEY
           --a-server localhost:PORT --a-client URL --a-secret SECRET
           [--a-stop CMD --a-start CMD]
           --b-kind synapse|courier --b-server localhost:PORT --b-client URL
           [--b-secret SECRET]                  (synapse: registration secret)
           [--b-rpc URL --b-rpc-secret SECRET]  (courier: internal RPC)
           [--b-stop CMD --b-start CMD]

`--x-stop`/`--x-start` are shell commands that stop a server and start it
again (start returns once the server answers); with them, the downtime checks
run. The checker also runs its own minimal federation peer ("capture") on a
free loopback port: it publishes a signed key, records what A (and B) send it,
and sends hand-built signed transactions to B.

Uses the standard library plus signedjson, which Synapse's
venv provides, and for the Olm checks olm_peer.py (python-olm, pinned in
requirements.txt next to Synapse). Every HTTP call and every poll loop is bounded in time; all
traffic goes to 127.0.0.1 (the server name `localhost` resolves there).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import secrets
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, Callable

import signedjson.key
import signedjson.sign

from olm_peer import OTK_ALGORITHM, OlmPeer

HTTP_TIMEOUT = 15.0  # seconds, for every request that is not a long-poll
DELIVERY_TIMEOUT = 60.0  # seconds to wait for a to-device message over federation
QUIET_SYNC_MS = 1500  # long-poll used to show that nothing more arrives
TEST_TYPE = "org.courier.interop.test"


class CheckError(Exception):
    pass


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


def http_json(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
    ctx: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON body or raw text)."""
    if not url.startswith(("http://127.0.0.1", "https://127.0.0.1", "https://localhost")):
        raise CheckError(f"refusing non-loopback URL {url}")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise CheckError(f"{method} {url}: {e}") from e
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def expect_200(method: str, url: str, **kw: Any) -> Any:
    status, body = http_json(method, url, **kw)
    if status != 200:
        raise CheckError(f"{method} {url} -> {status} {body}")
    return body


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


# --------------------------------------------------------------------------
# Accounts and nodes
# --------------------------------------------------------------------------


@dataclass
class Account:
    """One device of one user, driven through the Matrix client API."""

    node: "Node"
    user_id: str
    device_id: str
    token: str
    since: str | None = None
    received: list[dict] = field(default_factory=list)

    def send_to_device(self, ev_type: str, txn_id: str, messages: dict) -> None:
        url = (
            f"{self.node.client_url}/_matrix/client/v3/sendToDevice/"
            f"{q(ev_type)}/{q(txn_id)}"
        )
        body = expect_200("PUT", url, body={"messages": messages}, token=self.token)
        if body != {}:
            raise CheckError(f"sendToDevice answered {body!r}, expected {{}}")

    def sync(self, timeout_ms: int) -> list[dict]:
        params = {"timeout": str(timeout_ms)}
        if self.since is not None:
            params["since"] = self.since
        url = f"{self.node.client_url}/_matrix/client/v3/sync?" + urllib.parse.urlencode(params)
        body = expect_200("GET", url, token=self.token, timeout=timeout_ms / 1000 + HTTP_TIMEOUT)
        if not isinstance(body, dict) or not isinstance(body.get("next_batch"), str):
            raise CheckError(f"/sync without next_batch: {body!r}")
        events = (body.get("to_device") or {}).get("events") or []
        self.since = body["next_batch"]
        self.received.extend(events)
        return events

    def wait_for(self, pred: Callable[[list[dict]], bool], timeout: float) -> float:
        """Long-poll /sync until pred(all received events); returns seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        while not pred(self.received):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckError(f"not delivered to {self.user_id}/{self.device_id} within {timeout:.0f}s")
            self.sync(int(min(left, 5.0) * 1000))
        return time.monotonic() - start

    def matching(self, marker: str) -> list[dict]:
        return [e for e in self.received if (e.get("content") or {}).get("marker") == marker]


class Node:
    kind = "?"

    def __init__(self, label: str, server_name: str, client_url: str) -> None:
        self.label = label
        self.server_name = server_name
        self.client_url = client_url.rstrip("/")

    def new_user(self, localpart: str, device_ids: list[str]) -> list[Account]:
        raise NotImplementedError


class SynapseNode(Node):
    kind = "synapse"

    def __init__(self, label: str, server_name: str, client_url: str, secret: str) -> None:
        super().__init__(label, server_name, client_url)
        self.secret = secret

    def new_user(self, localpart: str, device_ids: list[str]) -> list[Account]:
        """Register through the shared-secret admin API, then log in once per device."""
        url = f"{self.client_url}/_synapse/admin/v1/register"
        nonce = expect_200("GET", url)["nonce"]
        password = secrets.token_urlsafe(16)
        # HMAC-SHA1 over nonce NUL username NUL password NUL "notadmin".
        msg = b"\x00".join(s.encode() for s in (nonce, localpart, password, "notadmin"))
        mac = hmac.new(self.secret.encode(), msg, digestmod=hashlib.sha1)
        reg = expect_200(
            "POST",
            url,
            body={"nonce": nonce, "username": localpart, "password": password,
                  "admin": False, "mac": mac.hexdigest()},
        )
        accounts = []
        for dev in device_ids:
            login = expect_200(
                "POST",
                f"{self.client_url}/_matrix/client/v3/login",
                body={"type": "m.login.password",
                      "identifier": {"type": "m.id.user", "user": localpart},
                      "password": password, "device_id": dev},
            )
            accounts.append(Account(self, reg["user_id"], login["device_id"], login["access_token"]))
        return accounts


class CourierNode(Node):
    """Courier: devices and tokens are registered through its internal RPC."""

    kind = "courier"

    def __init__(self, label: str, server_name: str, client_url: str, rpc_url: str, rpc_secret: str) -> None:
        super().__init__(label, server_name, client_url)
        self.rpc_url = rpc_url.rstrip("/")
        self.rpc_secret = rpc_secret

    def new_user(self, localpart: str, device_ids: list[str]) -> list[Account]:
        user_id = f"@{localpart}:{self.server_name}"
        accounts = []
        for dev in device_ids:
            token = secrets.token_urlsafe(24)
            url = f"{self.rpc_url}/_courier/v1/devices/{q(user_id)}/{q(dev)}"
            status, body = http_json("PUT", url, body={"access_token": token}, token=self.rpc_secret)
            if status not in (200, 201, 204):
                raise CheckError(f"PUT {url} -> {status} {body}")
            accounts.append(Account(self, user_id, dev, token))
        return accounts


# --------------------------------------------------------------------------
# Capture peer: a minimal federation server of our own
# --------------------------------------------------------------------------


class CapturePeer:
    """A homeserver name `localhost:<port>` that publishes a signed ed25519 key,
    records every transaction sent to it (verifying the X-Matrix signature
    against the sender's published key) and answers `{"pdus": {}}`; it can
    also send signed transactions of its own."""

    def __init__(self, cert: str, key: str, ca: str) -> None:
        self.client_ctx = ssl.create_default_context(cafile=ca)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        self.sni: list[str | None] = []  # server names asked for in TLS ClientHellos
        server_ctx.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.signing_key = signedjson.key.generate_signing_key("cap")
        self.key_id = "ed25519:cap"
        self.received: list[dict] = []  # {"origin", "txn_id", "body", "sig_ok"}
        self.cond = threading.Condition()
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def reply(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/_matrix/key/v2/server":
                    self.reply(200, peer.key_response())
                else:
                    self.reply(404, {"errcode": "M_UNRECOGNIZED", "error": "capture peer"})

            def do_PUT(self) -> None:
                m = re.fullmatch(r"/_matrix/federation/v1/send/([^/]+)/?", self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if not m:
                    self.reply(404, {"errcode": "M_UNRECOGNIZED", "error": "capture peer"})
                    return
                body = json.loads(raw)
                origin, sig_ok = peer.verify_x_matrix("PUT", self.path, body, self.headers.get_all("Authorization") or [])
                with peer.cond:
                    peer.received.append({"origin": origin, "txn_id": urllib.parse.unquote(m.group(1)),
                                          "body": body, "sig_ok": sig_ok,
                                          "authorization": self.headers.get_all("Authorization"),
                                          "headers": {k: self.headers.get(k) for k in
                                                      ("Host", "Content-Type", "User-Agent")}})
                    peer.cond.notify_all()
                self.reply(200, {"pdus": {}})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = server_ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.server_name = f"localhost:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()

    def key_response(self) -> dict:
        vk = signedjson.key.get_verify_key(self.signing_key)
        obj = {
            "server_name": self.server_name,
            "verify_keys": {self.key_id: {"key": signedjson.key.encode_verify_key_base64(vk)}},
            "old_verify_keys": {},
            "valid_until_ts": int(time.time() * 1000) + 86_400_000,
        }
        return signedjson.sign.sign_json(obj, self.server_name, self.signing_key)

    def verify_x_matrix(self, method: str, uri: str, body: Any, auths: list[str]) -> tuple[str | None, bool]:
        """Checks the first X-Matrix header against the origin's published key."""
        for auth in auths:
            scheme, _, params = auth.partition(" ")
            if scheme.lower() != "x-matrix":
                continue
            p = dict(
                (k.strip().lower(), v.strip().strip('"'))
                for k, _, v in (kv.partition("=") for kv in params.split(","))
            )
            origin = p.get("origin")
            try:
                keys = expect_200("GET", f"https://{origin}/_matrix/key/v2/server", ctx=self.client_ctx)
                algo, _, version = p["key"].partition(":")
                vk = signedjson.key.decode_verify_key_base64(algo, version, keys["verify_keys"][p["key"]]["key"])
                signed = {"method": method, "uri": uri, "origin": origin,
                          "destination": self.server_name, "content": body,
                          "signatures": {origin: {p["key"]: p["sig"]}}}
                signedjson.sign.verify_signed_json(signed, origin, vk)
                return origin, p.get("destination") == self.server_name
            except Exception:
                return origin, False
        return None, False

    def wait_for_edu(self, pred: Callable[[dict], bool], timeout: float) -> tuple[dict, dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for txn in self.received:
                    for edu in txn["body"].get("edus") or []:
                        if pred(edu):
                            return txn, edu
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckError(f"no matching EDU reached the capture peer within {timeout:.0f}s")
                self.cond.wait(left)

    def send_transaction(self, dest_server: str, txn_id: str, edus: list[dict]) -> tuple[int, Any]:
        """PUT /_matrix/federation/v1/send/{txnId} to dest_server, signed by us."""
        uri = f"/_matrix/federation/v1/send/{q(txn_id)}"
        body = {"origin": self.server_name, "origin_server_ts": int(time.time() * 1000), "pdus": [], "edus": edus}
        signed = signedjson.sign.sign_json(
            {"method": "PUT", "uri": uri, "origin": self.server_name, "destination": dest_server, "content": body},
            self.server_name,
            self.signing_key,
        )
        sig = signed["signatures"][self.server_name][self.key_id]
        auth = f'X-Matrix origin="{self.server_name}",destination="{dest_server}",key="{self.key_id}",sig="{sig}"'
        return http_json("PUT", f"https://{dest_server}{uri}", body=body,
                         headers={"Authorization": auth}, ctx=self.client_ctx)


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def info(self, name: str, text: str) -> None:
        print(f"INFO {name}: {text}", flush=True)

    def check(self, name: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
        except CheckError as e:
            self.failed += 1
            print(f"FAIL {name}: {e}", flush=True)
            return False
        except Exception as e:  # a bug in the checker or an unexpected reply
            self.failed += 1
            detail = traceback.format_exc(limit=3).strip().splitlines()[-1]
            print(f"FAIL {name}: {type(e).__name__}: {e} ({detail})", flush=True)
            return False
        self.passed += 1
        print(f"PASS {name}", flush=True)
        return True


def marker() -> str:
    return secrets.token_hex(8)


def expect_once(acct: Account, mk: str, sender: Account, content: dict) -> None:
    got = acct.matching(mk)
    if len(got) != 1:
        raise CheckError(f"{acct.device_id} got {len(got)} copies of {mk}, expected 1")
    want = {"sender": sender.user_id, "type": TEST_TYPE, "content": content}
    ev = {k: got[0].get(k) for k in ("sender", "type", "content")}
    if ev != want:
        raise CheckError(f"{acct.device_id} got {got[0]!r}, expected {want!r}")


def quiet_sync(*accts: Account) -> None:
    """One more long-poll per device with the new since: must bring nothing we sent."""
    for a in accts:
        for ev in a.sync(QUIET_SYNC_MS):
            if ev.get("type") == TEST_TYPE:
                raise CheckError(f"{a.device_id} got an unexpected/repeated event {ev!r}")


def direction_checks(r: Runner, tag: str, snd: Account, rcv: list[Account]) -> None:
    """snd (one device) sends to rcv's user (two devices, rcv[0] and rcv[1])."""
    d1, d2 = rcv
    for a in rcv:  # establish since tokens before anything is sent
        a.sync(0)

    def explicit() -> None:
        mk = marker()
        content = {"marker": mk, "case": "explicit", "unicode": "é😀", "nested": {"n": [1, 2.5, None, True]}}
        snd.send_to_device(TEST_TYPE, f"t{mk}", {d1.user_id: {d1.device_id: content}})
        waited = d1.wait_for(lambda evs: bool([e for e in evs if (e.get("content") or {}).get("marker") == mk]),
                             DELIVERY_TIMEOUT)
        r.info(f"{tag}_explicit_device", f"delivered in {waited:.2f}s")
        quiet_sync(d1, d2)
        expect_once(d1, mk, snd, content)
        if d2.matching(mk):
            raise CheckError(f"{d2.device_id} got a message addressed to {d1.device_id}")

    def wildcard() -> None:
        mk = marker()
        content = {"marker": mk, "case": "wildcard"}
        snd.send_to_device(TEST_TYPE, f"t{mk}", {d1.user_id: {"*": content}})
        for a in rcv:
            a.wait_for(lambda evs: bool([e for e in evs if (e.get("content") or {}).get("marker") == mk]),
                       DELIVERY_TIMEOUT)
        quiet_sync(d1, d2)
        for a in rcv:
            expect_once(a, mk, snd, content)

    def order() -> None:
        mks = [marker() for _ in range(5)]
        for i, mk in enumerate(mks):
            snd.send_to_device(TEST_TYPE, f"t{mk}", {d1.user_id: {d1.device_id: {"marker": mk, "i": i}}})
        d1.wait_for(lambda evs: all(any((e.get("content") or {}).get("marker") == mk for e in evs) for mk in mks),
                    DELIVERY_TIMEOUT)
        quiet_sync(d1)
        got = [(e.get("content") or {}).get("marker") for e in d1.received
               if (e.get("content") or {}).get("marker") in mks]
        if got != mks:
            raise CheckError(f"order/count wrong: got {got}, sent {mks}")

    def txn_retransmit() -> None:
        mk = marker()
        content = {"marker": mk, "case": "retransmit"}
        for _ in range(2):  # same txnId twice: one delivery
            snd.send_to_device(TEST_TYPE, f"t{mk}", {d1.user_id: {d1.device_id: content}})
        d1.wait_for(lambda evs: bool([e for e in evs if (e.get("content") or {}).get("marker") == mk]),
                    DELIVERY_TIMEOUT)
        quiet_sync(d1)
        expect_once(d1, mk, snd, content)

    def large() -> None:
        # Two ~40 KB messages in one request: over Synapse's 64 KiB soft EDU
        # limit together, so a Synapse sender splits them into two EDUs.
        mk = marker()
        contents = {a.device_id: {"marker": mk, "pad": secrets.token_hex(20_000)} for a in rcv}
        snd.send_to_device(TEST_TYPE, f"t{mk}", {d1.user_id: contents})
        for a in rcv:
            a.wait_for(lambda evs: bool([e for e in evs if (e.get("content") or {}).get("marker") == mk]),
                       DELIVERY_TIMEOUT)
        quiet_sync(d1, d2)
        for a in rcv:
            expect_once(a, mk, snd, contents[a.device_id])

    r.check(f"{tag}_explicit_device", explicit)
    r.check(f"{tag}_large_split", large)
    r.check(f"{tag}_wildcard_all_devices", wildcard)
    r.check(f"{tag}_order_5", order)
    r.check(f"{tag}_txn_retransmit_once", txn_retransmit)


def run_shell(cmd: str, timeout: float) -> None:
    try:
        res = subprocess.run(["bash", "-c", cmd], timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        raise CheckError(f"`{cmd}` did not finish within {timeout:.0f}s") from e
    if res.returncode != 0:
        raise CheckError(f"`{cmd}` exited {res.returncode}: {(res.stderr or res.stdout).strip()[-300:]}")


def downtime_check(r: Runner, tag: str, snd: Account, rcv: Account, stop: str, start: str) -> None:
    """Stop the receiver's server, send, start it again: the message must arrive
    exactly once. Reports how long after the restart it took."""

    def run() -> None:
        rcv.sync(0)
        run_shell(stop, 60)
        mk = marker()
        content = {"marker": mk, "case": "downtime"}
        snd.send_to_device(TEST_TYPE, f"t{mk}", {rcv.user_id: {rcv.device_id: content}})
        t_sent = time.monotonic()
        time.sleep(3)  # let the sender's first attempt fail against the stopped server
        run_shell(start, 120)
        t_up = time.monotonic()
        rcv.wait_for(lambda evs: bool([e for e in evs if (e.get("content") or {}).get("marker") == mk]), 180)
        t_seen = time.monotonic()
        r.info(tag, f"receiver down {t_up - t_sent:.1f}s (incl. restart); delivered "
                    f"{t_seen - t_up:.1f}s after it answered again, {t_seen - t_sent:.1f}s after the send")
        quiet_sync(rcv)
        expect_once(rcv, mk, snd, content)

    r.check(tag, run)


def capture_checks(r: Runner, work: str, cap: CapturePeer, node: Node, snd: Account) -> None:
    """What does `node` put on the wire for a to-device message to another server?"""
    tag = f"edu_from_{node.label}"

    def run() -> None:
        mk = marker()
        target = f"@cap:{cap.server_name}"
        snd.send_to_device(TEST_TYPE, f"t{mk}", {target: {"CAPDEV": {"marker": mk}, "*": {"marker": mk, "all": True}}})
        txn, edu = cap.wait_for_edu(lambda e: mk in json.dumps(e), DELIVERY_TIMEOUT)
        with open(os.path.join(work, f"{tag}.json"), "w") as f:
            json.dump({"txn_id": txn["txn_id"], "authorization": txn["authorization"],
                       "headers": txn["headers"], "body": txn["body"]}, f, indent=2)
        r.info(tag, "txn_id=" + json.dumps(txn["txn_id"]))
        r.info(tag, "Authorization: " + " | ".join(txn["authorization"]))
        r.info(tag, "headers: " + json.dumps(txn["headers"]) + "; TLS SNI seen: " + json.dumps(sorted(set(map(str, cap.sni)))))
        r.info(tag, "transaction keys: " + json.dumps(sorted(txn["body"])))
        r.info(tag, "edu: " + json.dumps(edu, sort_keys=True))
        if txn["origin"] != node.server_name or not txn["sig_ok"]:
            raise CheckError(f"X-Matrix did not verify (origin {txn['origin']!r}, destination ok: {txn['sig_ok']})")
        if edu.get("edu_type") != "m.direct_to_device":
            raise CheckError(f"edu_type {edu.get('edu_type')!r}")
        c = edu["content"]
        missing = {"sender", "type", "message_id", "messages"} - set(c)
        if missing:
            raise CheckError(f"EDU content lacks {sorted(missing)}")
        if c["sender"] != snd.user_id or c["type"] != TEST_TYPE:
            raise CheckError(f"sender/type wrong: {c['sender']!r} {c['type']!r}")
        if not isinstance(c["message_id"], str) or not 0 < len(c["message_id"]) <= 32:
            raise CheckError(f"message_id {c['message_id']!r} not a string of 1..32 characters")
        if c["messages"] != {target: {"CAPDEV": {"marker": mk}, "*": {"marker": mk, "all": True}}}:
            raise CheckError(f"messages altered: {c['messages']!r}")
        body = txn["body"]
        if body.get("origin") != node.server_name or body.get("pdus") != [] or not isinstance(body.get("origin_server_ts"), int):
            raise CheckError(f"transaction envelope: {({k: body.get(k) for k in ('origin', 'pdus', 'origin_server_ts')})!r}")

    r.check(tag, run)


def inbound_checks(r: Runner, cap: CapturePeer, node: Node, rcv: Account) -> None:
    """Hand-built signed transactions from the capture peer to `node`."""
    tag = f"inbound_{node.label}"
    sender = f"@capsender:{cap.server_name}"

    def edu(mk: str, message_id: str, sender_id: str = sender) -> dict:
        return {"edu_type": "m.direct_to_device",
                "content": {"sender": sender_id, "type": TEST_TYPE, "message_id": message_id,
                            "messages": {rcv.user_id: {rcv.device_id: {"marker": mk}}}}}

    def delivered_once(mk: str) -> None:
        rcv.wait_for(lambda evs: bool([e for e in evs if (e.get("content") or {}).get("marker") == mk]),
                     DELIVERY_TIMEOUT)
        quiet_sync(rcv)
        got = rcv.matching(mk)
        want = [{"sender": sender, "type": TEST_TYPE, "content": {"marker": mk}}]
        if [{k: e.get(k) for k in ("sender", "type", "content")} for e in got] != want:
            raise CheckError(f"got {got!r}, expected {want!r}")

    def basic() -> None:
        rcv.sync(0)
        mk = marker()
        status, body = cap.send_transaction(node.server_name, f"cap{mk}", [edu(mk, f"m{mk}")])
        r.info(tag, f"/send answered {status} {json.dumps(body)}")
        if status != 200 or body != {"pdus": {}}:
            raise CheckError(f"/send answered {status} {body!r}, expected 200 {{\"pdus\": {{}}}}")
        delivered_once(mk)

    def same_txn_twice() -> None:
        mk = marker()
        for _ in range(2):
            status, body = cap.send_transaction(node.server_name, f"cap{mk}", [edu(mk, f"m{mk}")])
            if status != 200 or body != {"pdus": {}}:
                raise CheckError(f"/send answered {status} {body!r}")
        delivered_once(mk)

    def same_message_id_new_txn() -> None:
        mk = marker()
        for i in range(2):
            status, body = cap.send_transaction(node.server_name, f"cap{mk}-{i}", [edu(mk, f"m{mk}")])
            if status != 200 or body != {"pdus": {}}:
                raise CheckError(f"/send answered {status} {body!r}")
        delivered_once(mk)

    def spoofed_sender() -> None:
        mk_bad, mk_good = marker(), marker()
        spoof = f"@mallory:{node.server_name}"  # not a user of the capture peer
        status, body = cap.send_transaction(node.server_name, f"cap{mk_bad}",
                                            [edu(mk_bad, f"m{mk_bad}", spoof), edu(mk_good, f"m{mk_good}")])
        if status != 200 or body != {"pdus": {}}:
            raise CheckError(f"/send answered {status} {body!r}")
        delivered_once(mk_good)  # the good EDU after it arrives, the spoofed one never does
        if rcv.matching(mk_bad):
            raise CheckError("spoofed-sender EDU was delivered")

    def unsigned() -> None:
        status, body = http_json("PUT", f"https://{node.server_name}/_matrix/federation/v1/send/nosig{marker()}",
                                 body={"origin": cap.server_name, "origin_server_ts": 0, "pdus": [], "edus": []},
                                 ctx=cap.client_ctx)
        r.info(f"{tag}_unsigned", f"answered {status} {json.dumps(body)}")
        if status != 401:
            raise CheckError(f"unsigned /send answered {status} {body!r}, expected 401")

    def unknown_edu_type() -> None:
        mk = marker()
        status, body = cap.send_transaction(
            node.server_name, f"cap{mk}",
            [{"edu_type": "org.courier.interop.unknown", "content": {"x": 1}}, edu(mk, f"m{mk}")])
        if status != 200 or body != {"pdus": {}}:
            raise CheckError(f"/send answered {status} {body!r}")
        delivered_once(mk)

    def nonlocal_recipient() -> None:
        # One EDU naming a user of another server next to a local recipient.
        # Synapse 1.163 fails the whole /send with 500 M_UNKNOWN "Error handing
        # EDU of type m.direct_to_device" (its handler raises 400 "Not a user
        # here" internally) and delivers nothing, so a Synapse sender would
        # retry such a transaction for ever. Courier [ours] skips the foreign
        # user, delivers the rest and answers 200.
        mk = marker()
        bad = edu(mk, f"m{mk}")
        bad["content"]["messages"][f"@other:{cap.server_name}"] = {"X": {"marker": mk}}
        status, body = cap.send_transaction(node.server_name, f"cap{mk}", [bad])
        r.info(f"{tag}_nonlocal_recipient", f"/send answered {status} {json.dumps(body)}")
        if node.kind == "synapse":
            if status != 500:
                raise CheckError(f"Synapse answered {status} {body!r}, expected 500")
            quiet_sync(rcv)
            if rcv.matching(mk):
                raise CheckError("Synapse delivered part of a rejected transaction")
        else:
            if status != 200 or body != {"pdus": {}}:
                raise CheckError(f"/send answered {status} {body!r}, expected 200")
            delivered_once(mk)

    r.check(f"{tag}_send", basic)
    r.check(f"{tag}_unknown_edu_type_ignored", unknown_edu_type)
    r.check(f"{tag}_nonlocal_recipient", nonlocal_recipient)
    r.check(f"{tag}_txn_dedupe", same_txn_twice)
    r.check(f"{tag}_message_id_dedupe", same_message_id_new_txn)
    r.check(f"{tag}_spoofed_sender_dropped", spoofed_sender)
    r.check(f"{tag}_unsigned_401", unsigned)


OLM_TYPE = "org.courier.interop.olm"
GROUPS = ("to_device", "capture", "olm", "downtime", "device_lists")


def olm_checks(r: Runner, a: Node, b: Node, run_id: str) -> None:
    """End-to-end encryption through both servers with libolm (python-olm,
    olm_peer.py): one fresh user with one device on each side uploads signed
    device keys, 5 signed one-time keys and a fallback key; each queries and
    claims the other's keys through its own server (so over federation), opens
    an Olm session, sends an m.room.encrypted pre-key message that the other
    side decrypts, and gets a type-1 reply it decrypts. Then each claims the
    other's remaining one-time keys until they run out: the fallback key comes
    next, again on the claim after, and an Olm session on it works too."""
    def request(method: str, url: str, body: Any, token: str) -> Any:
        return expect_200(method, url, body=body, token=token)

    peers: dict[str, OlmPeer] = {}
    inbox: dict[str, list[dict]] = {"a": [], "b": []}

    def setup() -> None:
        for label, node in (("a", a), ("b", b)):
            acct = node.new_user(f"olm{label}-{run_id}", [f"OLM{label.upper()}"])[0]
            peer = OlmPeer(request, CheckError, node.client_url, acct.user_id, acct.device_id, acct.token)
            counts = peer.upload_keys(5, fallback=True)
            if counts.get(OTK_ALGORITHM) != 5:
                raise CheckError(f"{label}: /keys/upload counts {counts!r}, expected {OTK_ALGORITHM}: 5")
            peers[label] = peer
            inbox[label].extend(peer.sync(0))
            otk_state(peer, 5, True)

    def otk_state(peer: OlmPeer, count: int, fallback_unused: bool) -> None:
        s = peer.last_sync
        got = (s.get("device_one_time_keys_count") or {}).get(OTK_ALGORITHM, 0)
        if got != count:
            raise CheckError(f"{peer.user_id}: /sync device_one_time_keys_count "
                             f"{s.get('device_one_time_keys_count')!r}, expected {OTK_ALGORITHM}: {count}")
        types = s.get("device_unused_fallback_key_types")
        if not isinstance(types, list) or (OTK_ALGORITHM in types) != fallback_unused:
            raise CheckError(f"{peer.user_id}: /sync device_unused_fallback_key_types {types!r}, "
                             f"expected {OTK_ALGORITHM} {'in' if fallback_unused else 'not in'} it")

    def next_encrypted(label: str, sender: str) -> dict:
        """Syncs `label`'s peer until an m.room.encrypted event from `sender` arrives."""
        peer = peers[label]
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while True:
            for ev in inbox[label]:
                if ev.get("type") == "m.room.encrypted" and ev.get("sender") == sender:
                    inbox[label].remove(ev)
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckError(f"no m.room.encrypted from {sender} reached {peer.user_id} "
                                 f"within {DELIVERY_TIMEOUT:.0f}s")
            inbox[label].extend(peer.sync(int(min(left, 5.0) * 1000)))

    def exchange(snd: str, rcv: str, one_time_key: dict) -> None:
        ps, pr = peers[snd], peers[rcv]
        ps.start_session(pr.user_id, pr.device_id, one_time_key["key"])
        mk = marker()
        content = {"marker": mk, "text": f"hello from {snd}", "unicode": "é😀"}
        if ps.send_encrypted(pr.user_id, pr.device_id, OLM_TYPE, content) != 0:
            raise CheckError("the first message of a new outbound session is not a pre-key message")
        msg_type, payload = pr.decrypt(next_encrypted(rcv, ps.user_id))
        if msg_type != 0 or payload.get("type") != OLM_TYPE or payload.get("content") != content:
            raise CheckError(f"{rcv} decrypted type {msg_type} {payload!r}, expected type 0 {content!r}")
        reply = {"marker": mk, "text": f"reply from {rcv}"}
        if pr.send_encrypted(ps.user_id, ps.device_id, OLM_TYPE, reply) != 1:
            raise CheckError("the reply on an inbound session is not a type-1 message")
        msg_type, payload = ps.decrypt(next_encrypted(snd, pr.user_id))
        if msg_type != 1 or payload.get("type") != OLM_TYPE or payload.get("content") != reply:
            raise CheckError(f"{snd} decrypted type {msg_type} {payload!r}, expected type 1 {reply!r}")

    def query(snd: str, rcv: str) -> None:
        ps, pr = peers[snd], peers[rcv]
        devices = ps.query(pr.user_id)
        got = devices.get(pr.device_id)
        want = pr.device_keys()
        if got is None or {k: v for k, v in got.items() if k != "unsigned"} != want:
            raise CheckError(f"{ps.user_id} sees {pr.user_id}'s devices as {devices!r}, expected {want!r}")

    def session(snd: str, rcv: str) -> None:
        ps, pr = peers[snd], peers[rcv]
        key_id, key = ps.claim(pr.user_id, pr.device_id)
        if key.get("fallback"):
            raise CheckError(f"first claim returned the fallback key {key_id}")
        inbox[rcv].extend(pr.sync(0))
        otk_state(pr, 4, True)
        exchange(snd, rcv, key)

    def fallback(snd: str, rcv: str) -> None:
        ps, pr = peers[snd], peers[rcv]
        seen: list[str] = []
        (fb_id, fb_key), = pr.fallback_keys.items()
        for _ in range(5):  # 4 one-time keys are left; the 5th claim must be the fallback
            key_id, key = ps.claim(pr.user_id, pr.device_id)
            if key.get("fallback"):
                break
            if key_id in seen or key_id == fb_id:
                raise CheckError(f"one-time key {key_id} handed out twice (claimed so far: {seen})")
            seen.append(key_id)
        else:
            raise CheckError(f"still one-time keys after 5 claims: {seen}")
        r.info(f"olm_fallback_{snd}_claims_{rcv}", f"one-time keys {seen}, then {key_id}")
        if len(seen) != 4:
            raise CheckError(f"fallback key after {len(seen)} one-time keys, expected the 4 left of 5")
        if (key_id, key) != (fb_id, fb_key):
            raise CheckError(f"fallback claim answered {key_id}: {key!r}, uploaded {fb_id}: {fb_key!r}")
        again = ps.claim(pr.user_id, pr.device_id)
        if again != (fb_id, fb_key):
            raise CheckError(f"the claim after the fallback answered {again!r}, expected the fallback again")
        inbox[rcv].extend(pr.sync(0))
        otk_state(pr, 0, False)
        exchange(snd, rcv, key)

    if not r.check("olm_setup_keys_uploaded", setup):
        return
    r.check("olm_query_a_sees_b", lambda: query("a", "b"))
    r.check("olm_query_b_sees_a", lambda: query("b", "a"))
    r.check("olm_a_to_b_prekey_and_reply", lambda: session("a", "b"))
    r.check("olm_b_to_a_prekey_and_reply", lambda: session("b", "a"))
    r.check("olm_fallback_a_claims_b", lambda: fallback("a", "b"))
    r.check("olm_fallback_b_claims_a", lambda: fallback("b", "a"))


def device_list_checks(r: Runner, a: Node, b: Node, run_id: str) -> None:
    """Device lists between Synapse (A) and Courier (B) with no shared room
    (issue 16). Synapse neither sends device-list EDUs to a server it shares
    no room with nor accepts them from one, so freshness comes from queries:
    (a) Synapse's /keys/query of a Courier user after a Courier device change
    (a device added, one deleted) returns the current list (Synapse asks
    live); (b) Courier's /keys/query of a Synapse user returns Synapse's
    current list, also after Synapse adds a device, and /keys/changes
    answers; (c) a Synapse /user/devices answer is accepted by Courier's
    resync: Courier is told over the RPC that its user tracks a fresh
    Synapse user, resyncs it from Synapse's /user/devices."""
    if not isinstance(b, CourierNode):
        return

    def request(method: str, url: str, body: Any, token: str) -> Any:
        return expect_200(method, url, body=body, token=token)

    def peer_for(node: Node, localpart: str, device_id: str) -> OlmPeer:
        acct = node.new_user(localpart, [device_id])[0]
        peer = OlmPeer(request, CheckError, node.client_url, acct.user_id, acct.device_id, acct.token)
        peer.upload_keys(1, fallback=False)
        return peer

    def courier_device(user_id: str, device_id: str) -> OlmPeer:
        token = secrets.token_urlsafe(24)
        url = f"{b.rpc_url}/_courier/v1/devices/{q(user_id)}/{q(device_id)}"
        expect_200("PUT", url, body={"access_token": token}, token=b.rpc_secret)
        peer = OlmPeer(request, CheckError, b.client_url, user_id, device_id, token)
        peer.upload_keys(1, fallback=False)
        return peer

    def synapse_device(localpart: str, password: str, device_id: str) -> OlmPeer:
        login = expect_200(
            "POST", f"{a.client_url}/_matrix/client/v3/login",
            body={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart},
                  "password": password, "device_id": device_id})
        peer = OlmPeer(request, CheckError, a.client_url, login["user_id"], device_id, login["access_token"])
        peer.upload_keys(1, fallback=False)
        return peer

    def expect_devices(asker: OlmPeer, user_id: str, want: set[str], what: str) -> None:
        got = set(asker.query(user_id))
        if got != want:
            raise CheckError(f"{what}: {asker.user_id} sees {user_id}'s devices {sorted(got)}, "
                             f"expected {sorted(want)}")

    state: dict[str, Any] = {}

    def resyncs_ok() -> float:
        status, text = http_json("GET", f"{b.rpc_url}/metrics", token=b.rpc_secret)
        if status != 200 or not isinstance(text, str):
            raise CheckError(f"/metrics -> {status}")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('courier_device_list_resyncs_total{outcome="ok"}'))

    def wait_for_resyncs(more_than: float, what: str) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while resyncs_ok() <= more_than:
            if time.monotonic() > deadline:
                raise CheckError(f"no successful resync of {what} within {DELIVERY_TIMEOUT:.0f}s")
            time.sleep(0.5)

    def setup() -> None:
        state["syn"] = peer_for(a, f"dlsyn-{run_id}", "DLSYN1")
        state["cou"] = peer_for(b, f"dlcou-{run_id}", "DLCOU1")

    def synapse_sees_courier_change() -> None:
        syn, cou = state["syn"], state["cou"]
        expect_devices(syn, cou.user_id, {"DLCOU1"}, "before the change")
        courier_device(cou.user_id, "DLCOU2")
        url = f"{b.rpc_url}/_courier/v1/devices/{q(cou.user_id)}/DLCOU1"
        status, body = http_json("DELETE", url, token=b.rpc_secret)
        if status != 200:
            raise CheckError(f"DELETE {url} -> {status} {body}")
        expect_devices(syn, cou.user_id, {"DLCOU2"}, "after DLCOU2 was added and DLCOU1 deleted")

    def courier_sees_synapse_change() -> None:
        # A second Courier device of a fresh user asks (its own user's token).
        asker = peer_for(b, f"dlask-{run_id}", "DLASK1")
        state["asker"] = asker
        # A Synapse user with a password we know, to log in a second device.
        localpart, password = f"dlsyn2-{run_id}", secrets.token_urlsafe(16)
        url = f"{a.client_url}/_synapse/admin/v1/register"
        nonce = expect_200("GET", url)["nonce"]
        msg = b"\x00".join(x.encode() for x in (nonce, localpart, password, "notadmin"))
        mac = hmac.new(a.secret.encode(), msg, digestmod=hashlib.sha1)
        expect_200("POST", url, body={"nonce": nonce, "username": localpart, "password": password,
                                      "admin": False, "mac": mac.hexdigest()})
        first = synapse_device(localpart, password, "DLS2A")
        before = resyncs_ok()
        expect_devices(asker, first.user_id, {"DLS2A"}, "first query")
        # The query made Courier track the user; its first resync fills the
        # cache with DLS2A before Synapse changes anything.
        wait_for_resyncs(before, first.user_id)
        sync = expect_200("GET", f"{b.client_url}/_matrix/client/v3/sync?timeout=0", token=asker.token)
        since = sync["next_batch"]
        synapse_device(localpart, password, "DLS2B")
        # Courier tracks the user now (it queried), but Synapse sends it no
        # update (no shared room): Courier asks Synapse live (its cache of a
        # user whose server never pushes does not answer by itself), so the
        # very next query shows the new device.
        got = set(asker.query(first.user_id))
        if got != {"DLS2A", "DLS2B"}:
            raise CheckError(f"Courier answers {sorted(got)} for {first.user_id} right after "
                             f"Synapse added DLS2B")
        # The live answer differs from Courier's resynced cache: Courier
        # resyncs, and the asker sees the Synapse user in device_lists.changed
        # and /keys/changes.
        start = time.monotonic()
        while True:
            sync = expect_200("GET", f"{b.client_url}/_matrix/client/v3/sync?timeout=0&since={q(since)}",
                              token=asker.token)
            changed = (sync.get("device_lists") or {}).get("changed") or []
            if first.user_id in changed:
                break
            if time.monotonic() - start > 20:
                raise CheckError(f"{first.user_id} not in /sync device_lists.changed 20s after "
                                 f"the live answer showed DLS2B (got {changed!r})")
            time.sleep(0.5)
        r.info("dl_courier_sees_synapse_change", f"in device_lists.changed after {time.monotonic() - start:.1f}s")
        to = sync["next_batch"]
        changes = expect_200("GET", f"{b.client_url}/_matrix/client/v3/keys/changes?from={q(since)}&to={q(to)}",
                             token=asker.token)
        if not isinstance(changes, dict) or not isinstance(changes.get("changed"), list) \
                or not isinstance(changes.get("left"), list) or first.user_id not in changes["changed"]:
            raise CheckError(f"/keys/changes answered {changes!r}")
        r.info("dl_courier_keys_changes", json.dumps(changes))

    def courier_resyncs_from_synapse() -> None:
        asker = state["asker"]
        target = peer_for(a, f"dlsyn3-{run_id}", "DLS3A")

        before = resyncs_ok()
        url = f"{b.rpc_url}/_courier/v1/users/{q(asker.user_id)}/device_list/tracking"
        body = expect_200("PUT", url, body={"track": [target.user_id]}, token=b.rpc_secret)
        if target.user_id not in (body or {}).get("tracked", []):
            raise CheckError(f"tracking answered {body!r}")
        wait_for_resyncs(before, target.user_id)
        # The list is Synapse's (asked live: Synapse never pushes to us).
        expect_devices(asker, target.user_id, {"DLS3A"}, "after the resync")
        got = asker.query(target.user_id)["DLS3A"]
        want = target.device_keys()
        if {k: v for k, v in got.items() if k != "unsigned"} != want:
            raise CheckError(f"cached keys {got!r}, Synapse holds {want!r}")

    if not r.check("dl_setup", setup):
        return
    r.check("dl_synapse_sees_courier_change", synapse_sees_courier_change)
    r.check("dl_courier_sees_synapse_change", courier_sees_synapse_change)
    r.check("dl_courier_resyncs_from_synapse", courier_resyncs_from_synapse)


def main() -> int:
    p = argparse.ArgumentParser(description="send-to-device interop checks")
    p.add_argument("--work", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--tls-cert", required=True)
    p.add_argument("--tls-key", required=True)
    for x in ("a", "b"):
        p.add_argument(f"--{x}-server", required=True)
        p.add_argument(f"--{x}-client", required=True)
        p.add_argument(f"--{x}-secret")
        p.add_argument(f"--{x}-stop")
        p.add_argument(f"--{x}-start")
    p.add_argument("--b-kind", choices=["synapse", "courier"], default="synapse")
    p.add_argument("--b-rpc")
    p.add_argument("--b-rpc-secret")
    p.add_argument("--only", help=f"comma-separated check groups to run (default all: {','.join(GROUPS)})")
    args = p.parse_args()
    groups = set(GROUPS) if not args.only else set(args.only.split(","))
    if groups - set(GROUPS):
        p.error(f"unknown check groups {sorted(groups - set(GROUPS))}; known: {', '.join(GROUPS)}")

    r = Runner()
    try:
        a = SynapseNode("a", args.a_server, args.a_client, args.a_secret)
        if args.b_kind == "synapse":
            b: Node = SynapseNode("b", args.b_server, args.b_client, args.b_secret)
        else:
            if not (args.b_rpc and args.b_rpc_secret):
                p.error("--b-kind courier needs --b-rpc and --b-rpc-secret")
            b = CourierNode("b", args.b_server, args.b_client, args.b_rpc, args.b_rpc_secret)

        run_id = secrets.token_hex(3)
        users: dict[str, list[Account]] = {}

        def make_users() -> None:
            users["alice"] = a.new_user(f"alice-{run_id}", ["ALICE1", "ALICE2"])
            users["bob"] = b.new_user(f"bob-{run_id}", ["BOB1", "BOB2"])

        if not r.check("setup_users", make_users):
            return finish(r)
        alice, bob = users["alice"], users["bob"]

        def no_rooms() -> None:
            for acct in alice + bob:
                if acct.node.kind != "synapse":
                    continue
                body = expect_200("GET", f"{acct.node.client_url}/_matrix/client/v3/joined_rooms", token=acct.token)
                if body != {"joined_rooms": []}:
                    raise CheckError(f"{acct.user_id} is in rooms: {body!r}")

        r.check("no_shared_room", no_rooms)
        # No room is created anywhere: to-device federation must not need one.
        if "to_device" in groups:
            direction_checks(r, "a_to_b", alice[0], bob)
            direction_checks(r, "b_to_a", bob[0], alice)

        if "capture" in groups:
            cap = CapturePeer(args.tls_cert, args.tls_key, args.ca)
            try:
                capture_checks(r, args.work, cap, a, alice[0])
                if b.kind != "synapse":
                    capture_checks(r, args.work, cap, b, bob[0])
                inbound_checks(r, cap, b, bob[1])
            finally:
                cap.close()

        if "olm" in groups:
            olm_checks(r, a, b, run_id)

        if "device_lists" in groups:
            device_list_checks(r, a, b, run_id)

        if "downtime" in groups and args.b_stop and args.b_start:
            downtime_check(r, "downtime_b_down_a_sends", alice[0], bob[0], args.b_stop, args.b_start)
        if "downtime" in groups and args.a_stop and args.a_start and b.kind != "synapse":
            downtime_check(r, "downtime_a_down_b_sends", bob[0], alice[0], args.a_stop, args.a_start)
    except KeyboardInterrupt:
        r.failed += 1
        print("FAIL interrupted: KeyboardInterrupt", flush=True)
    return finish(r)


def finish(r: Runner) -> int:
    print(f"{r.passed} passed, {r.failed} failed", flush=True)
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
