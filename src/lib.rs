//! Courier: a Matrix federation relay for send-to-device messages.
//!
//! The library holds everything; `main.rs` is a thin command-line edge over
//! it. The modules are declared in reading order: from the entry points and
//! the wiring, along a message's path (client edge, domain core, store,
//! sender, inbound federation), to the primitives that path stands on, the
//! cross-cutting parts, and last the developer tools. See ARCHITECTURE.md
//! for the codemap and the invariants.

// ---- entry and wiring -------------------------------------------------------

/// The subcommands (`serve`, `keygen`, `check-config`, `demo`, …); start here.
pub mod cli;

/// TOML and `COURIER_*` overrides, validated into a typed `Config`.
pub mod config;

/// Wiring: builds every component from a `Config` and serves the listeners.
pub mod server;

/// `AppState`, the handles every HTTP handler receives.
pub mod state;

/// The network edge of every listener: accept loop, connection and request
/// caps, deadlines, body limits.
pub mod listener;

// ---- a message's path -------------------------------------------------------

/// The client API: `/sendToDevice`, `/sync`, `/versions`, `/whoami`.
pub mod client_api;

/// The homeserver's internal API (devices, sends, inboxes, destinations,
/// quarantine) and `/metrics`.
pub mod rpc;

/// The to-device domain core (no HTTP): validate a send, split it into
/// local inbox rows and remote outbox EDUs, one store write, wake-ups.
pub mod todevice;

/// Message tracing: one story per message from the trace journal.
pub mod trace;

/// The E2EE device plane's domain core (no HTTP): device keys, one-time and
/// fallback keys, cross-signing keys and device management of local users,
/// and the fan-out of key queries and claims to other servers.
pub mod e2ee;

/// Wake-ups for `/sync` long-polls; they carry no data.
pub mod notify;

/// The durable store: the `Store` trait, SQLite and PostgreSQL backends, the
/// pruner.
pub mod store;

/// Federation: outbound client and discovery, the per-destination sender,
/// inbound `/send`, the remote key ring and our key endpoints.
pub mod federation;

/// One worker's part in a multi-worker deployment: destination leases and
/// cross-worker wake-ups.
pub mod cluster;

// ---- the primitives the path stands on --------------------------------------

/// Server names and user IDs (SPEC §9).
pub mod identifiers;

/// The canonical JSON encoder for everything signed or verified (SPEC §3.2).
pub mod canonical_json;

/// JSON signing and verification, unpadded base64.
pub mod signing;

/// Our server signing key and the key document we serve.
pub mod keys;

/// The X-Matrix `Authorization` header: parse, print, sign, verify.
pub mod xmatrix;

/// rustls server and client configurations and the trust store.
pub mod tls;

// ---- cross-cutting ----------------------------------------------------------

/// `MatrixError`: the one place failures become `errcode` + HTTP status.
pub mod error;

/// The Prometheus recorder and `/metrics` rendering.
pub mod metrics;

/// The wall clock: `now_ms` for stored and signed timestamps.
pub mod clock;

/// `lock`: the one way to take a `std::sync::Mutex`, poisoned or not.
pub mod sync;

// ---- apart from the relay ---------------------------------------------------

/// Developer tools (`demo`, `bench`, dev certificates, the RPC client); the
/// relay imports nothing from here.
pub mod tools;
