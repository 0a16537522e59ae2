//! The delivery seam: how the roles that hold no connections (fanout, chat for typing,
//! receipts, device unlinks, the notifier's presence check) reach connected devices. Whoever
//! holds the connections implements [`Gateways`]: in one process, the gateway's route registry
//! (`courier_gateway::Routes`).
//!
//! Every call returns at once and never waits on a connection: a delivery to a connection whose
//! queue is full is dropped, and what that means is the caller's to decide from the outcome
//! (an event is read again from the store by the connection itself; a receipt is held and
//! offered again; typing is lost).

use crate::membership::Members;
use courier_proto::{Event, ServerFrame};
use std::sync::Arc;

/// The connected devices, as the roles without connections see them.
pub trait Gateways: Send + Sync + 'static {
    /// Hands a committed event to every connected device of `recipients`, except the device
    /// that sent it (it got `sent`). Delivery is at-least-once: a connection with no room
    /// reads the event from the store once it has written what is queued.
    fn deliver(&self, event: Event, recipients: &Members);

    /// Offers a frame that may be lost (typing) or is retried by its sender (receipts) to
    /// every connected device of `user`, only where it leaves room for events. Returns how
    /// many of those connections had no room for it.
    fn offer(&self, user: &str, frame: &Arc<ServerFrame>) -> usize;

    /// Closes the connections of `user`'s `device`, which was unlinked.
    fn unlinked(&self, user: &str, device: &str);

    /// The devices of `user` connected now.
    fn connected_devices(&self, user: &str) -> Vec<String>;
}

/// Gateways with no device connected: for a process that runs no gateway, and for tests of
/// the roles that deliver.
pub struct NoGateways;

impl Gateways for NoGateways {
    fn deliver(&self, _event: Event, _recipients: &Members) {}

    fn offer(&self, _user: &str, _frame: &Arc<ServerFrame>) -> usize {
        0
    }

    fn unlinked(&self, _user: &str, _device: &str) {}

    fn connected_devices(&self, _user: &str) -> Vec<String> {
        Vec::new()
    }
}
