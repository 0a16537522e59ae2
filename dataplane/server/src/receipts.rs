//! Receipts: when a user's delivered/read cursors in a conversation advance, the other members'
//! connected devices get a `receipt`. In groups larger than `coalesce_above` members, receipts
//! are coalesced: at most one per member and conversation per `interval`, carrying the latest
//! cursors.

use crate::membership::MembershipCache;
use crate::routes::{Delivery, Routes};
use courier_proto::{Receipt, ServerFrame};
use courier_store::StoreError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct ReceiptRelay {
    routes: Arc<Routes>,
    membership: Arc<MembershipCache>,
    coalesce_above: usize,
    pending: Mutex<HashMap<(String, String), Receipt>>,
}

impl ReceiptRelay {
    pub fn new(
        routes: Arc<Routes>,
        membership: Arc<MembershipCache>,
        coalesce_above: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            routes,
            membership,
            coalesce_above,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `receipt` to the other members now, or at the next flush in a large group.
    pub async fn publish(&self, receipt: Receipt) -> Result<(), StoreError> {
        let members = self.membership.members(&receipt.conversation_id).await?;
        if members.len() > self.coalesce_above {
            let key = (receipt.conversation_id.clone(), receipt.user.clone());
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, receipt);
            return Ok(());
        }
        self.deliver(receipt, members.iter().map(|(m, _)| m.as_str()));
        Ok(())
    }

    fn deliver<'a>(&self, receipt: Receipt, members: impl Iterator<Item = &'a str>) {
        let user = receipt.user.clone();
        let frame = Arc::new(ServerFrame::Receipt(receipt));
        for member in members.filter(|m| *m != user) {
            for connection in self.routes.connections(member) {
                connection.deliver(Delivery::Frame(frame.clone()));
            }
        }
    }

    /// Flushes coalesced receipts every `interval`.
    pub fn start(self: &Arc<Self>, interval: Duration) {
        let relay = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let due: Vec<Receipt> = relay
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain()
                    .map(|(_, r)| r)
                    .collect();
                for receipt in due {
                    match relay.membership.members(&receipt.conversation_id).await {
                        Ok(members) => {
                            relay.deliver(receipt, members.iter().map(|(m, _)| m.as_str()))
                        }
                        Err(e) => tracing::warn!(error = %e, "receipt flush failed"),
                    }
                }
            }
        });
    }
}
