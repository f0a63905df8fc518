//! `RemoteKeys`: what the E2EE core asks of other servers (SPEC-E2EE §3:
//! `/user/keys/query`, `/user/keys/claim`, `/user/devices/{userId}`), and
//! the validated shapes of their answers. The outbound federation client
//! implements it (`federation::outbound::user_keys`); the core never sees a
//! raw remote body. An implementation keeps only what was asked of that
//! server: users of other servers, users or devices not asked for, device
//! objects whose `user_id`/`device_id` do not match where they sit, and
//! cross-signing keys of another user are dropped, and a body that is not
//! the expected shape at all is a `RemoteError::BadResponse`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;

use crate::identifiers::{ServerName, UserId};

/// The future every remote call returns.
pub type RemoteFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, RemoteError>> + Send + 'a>>;

/// Why a remote server gave no usable answer. Each lands in the client
/// response's `failures` under the server's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    /// Discovery, connection, TLS, denylist or backoff: nothing was asked.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No answer within the timeout.
    #[error("timed out")]
    Timeout,
    /// The server answered with a non-200 status.
    #[error("refused with {status} {errcode:?}")]
    Refused {
        status: u16,
        errcode: Option<String>,
    },
    /// A 200 whose body is not the expected shape.
    #[error("bad response: {0}")]
    BadResponse(String),
}

/// A key query to one server: user ID → device IDs (empty: all devices).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteQuery {
    pub device_keys: BTreeMap<String, Vec<String>>,
}

/// A server's validated answer to a key query. Every value is the JSON
/// object as the server sent it (signatures cover it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteQueryAnswer {
    /// user ID → device ID → device keys object.
    pub device_keys: BTreeMap<String, BTreeMap<String, Value>>,
    /// user ID → master key object.
    pub master_keys: BTreeMap<String, Value>,
    /// user ID → self-signing key object.
    pub self_signing_keys: BTreeMap<String, Value>,
}

/// A key claim to one server: user ID → device ID → algorithm.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteClaim {
    pub one_time_keys: BTreeMap<String, BTreeMap<String, String>>,
}

/// A server's validated answer to a key claim: user ID → device ID →
/// `"<algorithm>:<key_id>"` → key (object or string) as sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteClaimAnswer {
    pub one_time_keys: BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>>,
}

/// A server's validated answer to `GET /user/devices/{userId}`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteUserDevices {
    pub user_id: String,
    pub stream_id: i64,
    /// Each `{device_id, keys?, device_display_name?}` as sent.
    pub devices: Vec<Value>,
    pub master_key: Option<Value>,
    pub self_signing_key: Option<Value>,
}

/// Key queries and claims to other servers. `timeout` bounds the whole
/// call, discovery included.
pub trait RemoteKeys: Send + Sync + 'static {
    fn query_keys<'a>(
        &'a self,
        server: &'a ServerName,
        query: RemoteQuery,
        timeout: Duration,
    ) -> RemoteFuture<'a, RemoteQueryAnswer>;

    fn claim_keys<'a>(
        &'a self,
        server: &'a ServerName,
        claim: RemoteClaim,
        timeout: Duration,
    ) -> RemoteFuture<'a, RemoteClaimAnswer>;

    fn user_devices<'a>(
        &'a self,
        server: &'a ServerName,
        user: &'a UserId,
        timeout: Duration,
    ) -> RemoteFuture<'a, RemoteUserDevices>;
}
