// PLACEHOLDER (e2ee-base branch only, replaced by the federation lane).

use std::time::Duration;

use crate::e2ee::remote::*;
use crate::identifiers::{ServerName, UserId};

use super::client::FederationClient;

impl RemoteKeys for FederationClient {
    fn query_keys<'a>(
        &'a self,
        _server: &'a ServerName,
        _query: RemoteQuery,
        _timeout: Duration,
    ) -> RemoteFuture<'a, RemoteQueryAnswer> {
        Box::pin(async { Err(RemoteError::Unreachable("not implemented yet".into())) })
    }
    fn claim_keys<'a>(
        &'a self,
        _server: &'a ServerName,
        _claim: RemoteClaim,
        _timeout: Duration,
    ) -> RemoteFuture<'a, RemoteClaimAnswer> {
        Box::pin(async { Err(RemoteError::Unreachable("not implemented yet".into())) })
    }
    fn user_devices<'a>(
        &'a self,
        _server: &'a ServerName,
        _user: &'a UserId,
        _timeout: Duration,
    ) -> RemoteFuture<'a, RemoteUserDevices> {
        Box::pin(async { Err(RemoteError::Unreachable("not implemented yet".into())) })
    }
}
