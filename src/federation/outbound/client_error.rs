//! The error of the outbound federation side (`ClientError`): why a request
//! to another server failed, in variants the sender decides retry versus
//! refusal from. It lives apart from the client so that the connector,
//! discovery and the transaction sender can name it without importing the
//! client, which imports them. Also here: `describe_hyper_error`, the one-line
//! rendering of a hyper client error with its causes.

use std::error::Error as _;

/// Why a federation request failed. The sender decides retry versus refusal
/// from the variant.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("discovery failed for {destination}: {reason}")]
    Discovery { destination: String, reason: String },
    #[error("{destination} resolves only to denied addresses")]
    Denied { destination: String },
    #[error("connecting to {destination}: {reason}")]
    Connect { destination: String, reason: String },
    #[error("request to {destination} timed out")]
    Timeout { destination: String },
    #[error("{destination} answered {status}")]
    Status {
        destination: String,
        status: u16,
        body: String,
        retry_after_ms: Option<u64>,
    },
    #[error("{destination} sent an invalid response: {reason}")]
    BadResponse { destination: String, reason: String },
    #[error("building the request: {0}")]
    Request(String),
}

impl ClientError {
    /// The same error, naming `destination` (the server name) as the peer.
    pub(crate) fn for_destination(self, destination: &str) -> ClientError {
        let d = destination.to_owned();
        match self {
            ClientError::Discovery { reason, .. } => ClientError::Discovery {
                destination: d,
                reason,
            },
            ClientError::Denied { .. } => ClientError::Denied { destination: d },
            ClientError::Connect { reason, .. } => ClientError::Connect {
                destination: d,
                reason,
            },
            ClientError::Timeout { .. } => ClientError::Timeout { destination: d },
            ClientError::Status {
                status,
                body,
                retry_after_ms,
                ..
            } => ClientError::Status {
                destination: d,
                status,
                body,
                retry_after_ms,
            },
            ClientError::BadResponse { reason, .. } => ClientError::BadResponse {
                destination: d,
                reason,
            },
            ClientError::Request(reason) => ClientError::Request(reason),
        }
    }

    /// Whether the connection path itself failed (not the peer's answer):
    /// then the authority's pooled connections are closed.
    pub(crate) fn is_transport(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Timeout { .. }
                | ClientError::BadResponse { .. }
        )
    }
}

/// An error and its causes on one line.
pub(crate) fn describe_hyper_error(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
