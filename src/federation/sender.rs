//! The per-destination sender: one task per destination, which turns stored
//! outbox rows into federation transactions, one in flight at a time, with a
//! persisted backoff. (Contract only; the outbound federation work fills in
//! `Sender`.)

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::federation::client::FederationClient;
use crate::store::Store;

/// What other parts of Courier tell the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderCommand {
    /// New outbox rows exist for this destination.
    Wake(String),
    /// An authenticated request arrived from this server, or an operator
    /// asked: reset its backoff and send now.
    PeerIsUp(String),
}

/// A cheap, cloneable handle for waking destinations.
#[derive(Clone, Debug)]
pub struct SenderHandle {
    commands: mpsc::UnboundedSender<SenderCommand>,
}

impl SenderHandle {
    /// A handle and the receiver the `Sender` consumes.
    pub fn channel() -> (SenderHandle, mpsc::UnboundedReceiver<SenderCommand>) {
        let (commands, rx) = mpsc::unbounded_channel();
        (SenderHandle { commands }, rx)
    }

    pub fn wake(&self, destination: &str) {
        let _ = self
            .commands
            .send(SenderCommand::Wake(destination.to_owned()));
    }

    pub fn peer_is_up(&self, destination: &str) {
        let _ = self
            .commands
            .send(SenderCommand::PeerIsUp(destination.to_owned()));
    }
}

/// Owns every destination task.
pub struct Sender {
    commands: mpsc::UnboundedReceiver<SenderCommand>,
}

impl Sender {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        client: Arc<FederationClient>,
        commands: mpsc::UnboundedReceiver<SenderCommand>,
    ) -> Self {
        let _ = (config, store, client);
        Sender { commands }
    }

    /// Runs until `shutdown`: wakes every destination with pending rows
    /// (staggered), then serves commands.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut commands = self.commands;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                command = commands.recv() => if command.is_none() { return },
            }
        }
    }
}
