#!/usr/bin/env python3
"""interop/synapse/gen_config.py: write a Synapse homeserver for the interop
harness into a work directory: homeserver.yaml, log.yaml and an ed25519 signing
key. Standard library only.

The homeserver listens for federation on 127.0.0.1:<fed port> over TLS and for
the client API on 127.0.0.1:<client port> over plain HTTP; its server name
carries an explicit port (localhost:<fed port>), so peers connect straight to
it with no .well-known or SRV lookup. Outbound federation verifies peer
certificates against the given CA only, and loopback is explicitly allowed.

homeserver.yaml is written as JSON, which is valid YAML and avoids hand-rolled
quoting. Usage:

  gen_config.py --dir DIR --fed-port 8448 --client-port 8008 \
      --tls-cert localhost.crt --tls-key localhost.key --ca dev-ca.crt \
      --shared-secret SECRET [--server-name localhost:8448] \
      [--retry-profile fast|default]
"""

import argparse
import base64
import json
import os
import secrets
import sys


def unpadded_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


# Synapse's federation sender backs off per destination (10 min first, x2, up
# to 7 days) and, inside one transaction attempt, retries 10 times with delays
# 4 s, 16 s, then 60 s each (jitter x0.8-1.4). "fast" shrinks every interval
# so that a peer that was down for a few seconds gets its messages within
# about a second of coming back (see interop/README.md for measured numbers).
RETRY_PROFILES = {
    "default": {},
    "fast": {
        "client_timeout": "20s",
        "max_short_retry_delay": "1s",
        "max_long_retry_delay": "1s",
        "max_long_retries": 120,
        "destination_min_retry_interval": "1s",
        "destination_retry_multiplier": 2,
        "destination_max_retry_interval": "5s",
    },
}

RELAXED = {"per_second": 1000, "burst_count": 10000}


def homeserver_config(args: argparse.Namespace) -> dict:
    d = os.path.abspath(args.dir)
    return {
        "server_name": args.server_name,
        "public_baseurl": f"http://127.0.0.1:{args.client_port}/",
        "pid_file": os.path.join(d, "homeserver.pid"),
        "report_stats": False,
        "listeners": [
            {
                "port": args.fed_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": True,
                "x_forwarded": False,
                "resources": [{"names": ["federation"], "compress": False}],
            },
            {
                "port": args.client_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            },
        ],
        "tls_certificate_path": os.path.abspath(args.tls_cert),
        "tls_private_key_path": os.path.abspath(args.tls_key),
        # Outbound federation: verify peers, but against our test CA only.
        "federation_verify_certificates": True,
        "federation_custom_ca_list": [os.path.abspath(args.ca)],
        # Synapse refuses to connect to private/loopback ranges by default.
        # Do NOT set federation_ip_range_blacklist: if present, Synapse uses it
        # for federation and ignores ip_range_whitelist.
        "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
        # Fetch peers' signing keys directly from them, never from matrix.org.
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "database": {
            "name": "sqlite3",
            "args": {"database": os.path.join(d, "homeserver.db")},
        },
        "log_config": os.path.join(d, "log.yaml"),
        "media_store_path": os.path.join(d, "media_store"),
        "signing_key_path": os.path.join(d, "signing.key"),
        "registration_shared_secret": args.shared_secret,
        "enable_registration": False,
        "macaroon_secret_key": secrets.token_hex(32),
        "form_secret": secrets.token_hex(32),
        "presence": {"enabled": False},
        "enable_metrics": False,
        "url_preview_enabled": False,
        "federation": RETRY_PROFILES[args.retry_profile],
        # Tests log in and send in bursts; none of this should throttle them.
        "rc_message": RELAXED,
        "rc_key_requests": RELAXED,
        "rc_registration": RELAXED,
        "rc_login": {
            "address": RELAXED,
            "account": RELAXED,
            "failed_attempts": RELAXED,
        },
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 10000,
            "sleep_delay": 1,
            "reject_limit": 100000,
            "concurrent": 100,
        },
    }


def log_config(d: str) -> dict:
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                " - %(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": os.path.join(d, "homeserver.log"),
                "encoding": "utf8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--server-name", help="default: localhost:<fed port>")
    p.add_argument("--fed-port", type=int, required=True)
    p.add_argument("--client-port", type=int, required=True)
    p.add_argument("--tls-cert", required=True)
    p.add_argument("--tls-key", required=True)
    p.add_argument("--ca", required=True, help="CA that peers' certificates chain to")
    p.add_argument("--shared-secret", required=True)
    p.add_argument("--retry-profile", choices=sorted(RETRY_PROFILES), default="fast")
    args = p.parse_args()
    if args.server_name is None:
        args.server_name = f"localhost:{args.fed_port}"
    for path in (args.tls_cert, args.tls_key, args.ca):
        if not os.path.isfile(path):
            print(f"gen_config.py: no such file: {path}", file=sys.stderr)
            return 2

    os.makedirs(args.dir, exist_ok=True)
    os.makedirs(os.path.join(args.dir, "media_store"), exist_ok=True)
    with open(os.path.join(args.dir, "homeserver.yaml"), "w") as f:
        json.dump(homeserver_config(args), f, indent=2)
        f.write("\n")
    with open(os.path.join(args.dir, "log.yaml"), "w") as f:
        json.dump(log_config(os.path.abspath(args.dir)), f, indent=2)
        f.write("\n")
    key_path = os.path.join(args.dir, "signing.key")
    if not os.path.exists(key_path):
        # Synapse's key file: "ed25519 <version> <unpadded base64 32-byte seed>".
        version = "a_" + secrets.token_hex(2)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"ed25519 {version} {unpadded_b64(secrets.token_bytes(32))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
