//! Devices of a user: last seen, unlinking (tokens issued before are refused, cursors
//! dropped, open connections closed), activity for retention.

use crate::auth::{AuthError, Identity};
use crate::error::ApiError;
use crate::fanout::now_ms;
use crate::routes::{KickReason, Routes};
use courier_store::{DeviceRecord, MessageStore};

/// A device as listed by `GET /v1/devices`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceView {
    pub device: String,
    pub last_seen_ms: u64,
    pub push: bool,
}

pub struct Devices {
    store: MessageStore,
}

impl Devices {
    pub fn new(store: MessageStore) -> Self {
        Self { store }
    }

    /// Records that the device is active now. Failures are logged: activity is advisory.
    pub async fn seen(&self, who: &Identity) {
        let result = async {
            let mut record = self
                .store
                .device(&who.user, &who.device)
                .await?
                .unwrap_or_default();
            record.last_seen_ms = now_ms();
            self.store.put_device(&who.user, &who.device, &record).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(user = %who.user, device = %who.device, error = %e, "could not record device activity");
        }
    }

    /// Refuses tokens issued (at or) before the device was unlinked.
    pub async fn check_linked(&self, who: &Identity) -> Result<(), ApiError> {
        let record = self.store.device(&who.user, &who.device).await?;
        match record {
            Some(DeviceRecord { unlinked_ms, .. })
                if unlinked_ms > 0 && who.issued_at_ms <= unlinked_ms =>
            {
                Err(AuthError::Unlinked.into())
            }
            _ => Ok(()),
        }
    }

    /// The user's linked devices.
    pub async fn list(&self, user: &str) -> Result<Vec<DeviceView>, ApiError> {
        Ok(self
            .store
            .devices(user)
            .await?
            .into_iter()
            .filter(|(_, record)| record.unlinked_ms == 0)
            .map(|(device, record)| DeviceView {
                device,
                last_seen_ms: record.last_seen_ms,
                push: !record.push_token.is_empty(),
            })
            .collect())
    }

    /// Registers (or replaces) the device's push endpoint.
    pub async fn register_push(
        &self,
        who: &Identity,
        provider: &str,
        token: &str,
        configured: bool,
    ) -> Result<(), ApiError> {
        if !matches!(provider, "fcm" | "apns" | "webhook") {
            return Err(ApiError::bad_request(
                "provider must be \"fcm\", \"apns\" or \"webhook\"",
            ));
        }
        if !configured {
            return Err(ApiError::bad_request(format!(
                "this server has no {provider} push provider configured"
            )));
        }
        if token.is_empty() || token.len() > 4096 {
            return Err(ApiError::bad_request("token must be 1 to 4096 bytes"));
        }
        self.store
            .set_push_token(&who.user, &who.device, provider, token)
            .await?;
        Ok(())
    }

    /// Unlinks one of the user's devices and closes its connections.
    pub async fn unlink(&self, user: &str, device: &str, routes: &Routes) -> Result<(), ApiError> {
        courier_proto::ids::device_id(device)?;
        match self.store.device(user, device).await? {
            Some(record) if record.unlinked_ms == 0 => {}
            _ => return Err(ApiError::not_found(format!("no linked device {device}"))),
        }
        self.store.unlink_device(user, device, now_ms()).await?;
        for connection in routes.connections(user) {
            if connection.device == device {
                connection.close(KickReason::Unlinked);
            }
        }
        Ok(())
    }
}
