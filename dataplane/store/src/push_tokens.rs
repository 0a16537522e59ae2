//! The index of push tokens: `("ptok", provider, token)` names the device that registered the
//! token last (`PushTokenHolder`).
//!
//! A provider's token names one app instance. When someone else signs in on that instance (Ann
//! signs out of a shared phone without unlinking it, Bob signs in) and registers it, the index
//! finds the device that held it, and that device's registration is dropped in the same commit
//! as the new one: an app instance never gets two users' notifications.
//!
//! Every change of a device's push token goes through [`MessageStore::index_push_token`]
//! (from the device update that makes it), so the index follows registrations, renewals with a
//! new token, refusals by the provider and unlinks; a token given up leaves it, so the index
//! holds the live registrations only. Registrations written before the index have no entry:
//! an app that registers its token again at each start writes the entry if it is missing
//! ([`MessageStore::register_push_token`]), and the push notifier asks
//! [`MessageStore::push_token_taken`] before each send, which finds a device whose token the
//! index gives to another, and ends its registration with
//! [`MessageStore::drop_taken_push_token`] (unless the device registered again meanwhile). (A registration from before the index whose token another device
//! took and gave up again before any notification of its own was sent is not found.)

use crate::keys::push_registration_slot;
use crate::kv::{Batch, StoreError};
use crate::message_store::{DeviceRecord, MessageStore, corrupt};
use prost::Message;

/// The device that registered a push token last.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PushTokenHolder {
    #[prost(string, tag = "1")]
    pub user: String,
    #[prost(string, tag = "2")]
    pub device: String,
}

impl PushTokenHolder {
    fn is(&self, user: &str, device: &str) -> bool {
        self.user == user && self.device == device
    }
}

/// A device's push registration: provider and token, if it has one.
fn registration(record: &DeviceRecord) -> Option<(&str, &str)> {
    (!record.push_token.is_empty())
        .then_some((record.push_provider.as_str(), record.push_token.as_str()))
}

impl MessageStore {
    /// Adds to `batch`, which changes `user`'s `device` from `current` to `next`, what keeps
    /// the index in step (module documentation): a token the device gives up leaves the index
    /// while the index names the device; a token it registers is indexed as its own, and taken
    /// from the device that held it before. Reads only when the token changes, or when
    /// `registering` it again (an app's registration, not its connection's activity), and
    /// fences what it read, so that a concurrent registration of the same token refuses the
    /// commit.
    pub(crate) async fn index_push_token(
        &self,
        batch: &mut Batch,
        (user, device): (&str, &str),
        current: Option<&DeviceRecord>,
        next: &DeviceRecord,
        registering: bool,
    ) -> Result<(), StoreError> {
        let held = current.and_then(registration);
        let registered = registration(next);
        if held == registered && !(registering && registered.is_some()) {
            return Ok(());
        }
        if let Some((provider, token)) = held.filter(|held| Some(*held) != registered) {
            let key = self.keys().push_token(provider, token);
            let stored = self.kv().get(&key).await?;
            if holder(&key, stored.as_deref())?.is_some_and(|h| h.is(user, device)) {
                batch.fence(key.clone(), stored).clear(key);
            }
        }
        if let Some((provider, token)) = registered {
            let key = self.keys().push_token(provider, token);
            let stored = self.kv().get(&key).await?;
            match holder(&key, stored.as_deref())? {
                // Indexed already: nothing to write (an app registering at each start).
                Some(before) if before.is(user, device) => return Ok(()),
                Some(before) => {
                    self.take_registration(batch, &before, provider, token)
                        .await?;
                }
                None => {}
            }
            let holder = PushTokenHolder {
                user: user.to_owned(),
                device: device.to_owned(),
            };
            batch
                .fence(key.clone(), stored)
                .set(key, holder.encode_to_vec());
        }
        Ok(())
    }

    /// Adds to `batch` the end of `holder`'s registration of `token`, if it still has it
    /// (whether it had).
    async fn take_registration(
        &self,
        batch: &mut Batch,
        holder: &PushTokenHolder,
        provider: &str,
        token: &str,
    ) -> Result<bool, StoreError> {
        let key = self.keys().device(&holder.user, &holder.device);
        let stored = self.kv().get(&key).await?;
        let Some(record) = stored
            .as_deref()
            .map(DeviceRecord::decode)
            .transpose()
            .map_err(|e| corrupt(&key, e))?
        else {
            return Ok(false);
        };
        if registration(&record) != Some((provider, token)) {
            return Ok(false);
        }
        let taken = DeviceRecord {
            push_provider: String::new(),
            push_token: String::new(),
            ..record.clone()
        };
        if record.takes_push() {
            let slot = push_registration_slot(&holder.user);
            batch
                .add(self.keys().push_registration_changes(), 1)
                .add(self.keys().push_registration_changes_in(slot), 1);
        }
        batch
            .fence(key.clone(), stored)
            .set(key, taken.encode_to_vec());
        Ok(true)
    }

    /// Whether the index gives the push token of `user`'s `device` (`record`) to another
    /// device: registered there since, so this device must not be notified with it. A token
    /// registered before the index, and registered by no one since, has no entry: not taken.
    pub async fn push_token_taken(
        &self,
        user: &str,
        device: &str,
        record: &DeviceRecord,
    ) -> Result<bool, StoreError> {
        Ok(self.taken_entry(user, device, record).await?.is_some())
    }

    /// Ends the registration of `user`'s `device` (`record`) while the index gives its token to
    /// another device ([`Self::push_token_taken`]), in a commit fenced on the index and the
    /// device: if the device registered again meanwhile (the same token, which the index then
    /// names, or another), it keeps that registration. Whether the registration ended.
    pub async fn drop_taken_push_token(
        &self,
        user: &str,
        device: &str,
        record: &DeviceRecord,
    ) -> Result<bool, StoreError> {
        let Some((provider, token, key, stored)) = self.taken_entry(user, device, record).await?
        else {
            return Ok(false);
        };
        let mut batch = Batch::new();
        batch.fence(key, stored);
        let taken = PushTokenHolder {
            user: user.to_owned(),
            device: device.to_owned(),
        };
        if !self
            .take_registration(&mut batch, &taken, provider, token)
            .await?
        {
            return Ok(false);
        }
        match self.kv().commit(batch).await {
            Ok(_) => Ok(true),
            // The index or the device changed since: the notifier tries the notification
            // again with what the device holds now, and this drop is decided again if due.
            Err(StoreError::FenceChanged { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The push registration of `user`'s `device` (`record`: provider and token) and its
    /// index entry's key and value, if the entry names another device.
    async fn taken_entry<'r>(
        &self,
        user: &str,
        device: &str,
        record: &'r DeviceRecord,
    ) -> Result<Option<TakenEntry<'r>>, StoreError> {
        let Some((provider, token)) = registration(record) else {
            return Ok(None);
        };
        let key = self.keys().push_token(provider, token);
        let stored = self.kv().get(&key).await?;
        let taken = holder(&key, stored.as_deref())?.is_some_and(|h| !h.is(user, device));
        Ok(taken.then_some((provider, token, key, stored)))
    }
}

/// A registration's provider and token, and its index entry's key and value, as read.
type TakenEntry<'r> = (&'r str, &'r str, Vec<u8>, Option<Vec<u8>>);

/// The holder a read of the index found at `key`.
fn holder(key: &[u8], stored: Option<&[u8]>) -> Result<Option<PushTokenHolder>, StoreError> {
    stored
        .map(PushTokenHolder::decode)
        .transpose()
        .map_err(|e| corrupt(key, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faulty_engine::FaultyEngine;

    fn registered(
        provider: &'static str,
        token: &'static str,
    ) -> impl Fn(Option<&DeviceRecord>) -> Option<DeviceRecord> {
        move |record| {
            Some(DeviceRecord {
                push_provider: provider.into(),
                push_token: token.into(),
                ..record.cloned().unwrap_or_default()
            })
        }
    }

    async fn token_of(store: &MessageStore, user: &str) -> String {
        store
            .device(user, "phone")
            .await
            .unwrap()
            .unwrap()
            .push_token
    }

    async fn holder_of(store: &MessageStore, token: &str) -> Option<PushTokenHolder> {
        let key = store.keys().push_token("fcm", token);
        let stored = store.kv().get(&key).await.unwrap();
        holder(&key, stored.as_deref()).unwrap()
    }

    /// Ann signs out of a phone without unlinking it and Bob signs in there: the app instance's
    /// token is Bob's alone, and Ann's device is no longer notified with it.
    #[tokio::test]
    async fn a_token_registered_by_another_user_is_taken_from_the_first() {
        let store = FaultyEngine::new().store(4).await;
        store
            .update_device("ann", "phone", registered("fcm", "T"))
            .await
            .unwrap();
        let before = store.push_registration_counts(None).await.unwrap().total;
        store
            .update_device("bob", "phone", registered("fcm", "T"))
            .await
            .unwrap();
        assert_eq!(
            token_of(&store, "ann").await,
            "",
            "Ann's registration ended"
        );
        assert_eq!(token_of(&store, "bob").await, "T");
        let bob = PushTokenHolder {
            user: "bob".into(),
            device: "phone".into(),
        };
        assert_eq!(holder_of(&store, "T").await, Some(bob));
        let after = store.push_registration_counts(None).await.unwrap().total;
        assert_eq!(
            after,
            before + 2,
            "Ann's end and Bob's beginning are counted"
        );
        // The same token under another provider is another app instance's.
        store
            .update_device("cat", "phone", registered("apns", "T"))
            .await
            .unwrap();
        assert_eq!(token_of(&store, "bob").await, "T");
    }

    /// A device that gives a token up (a new one, a refusal by the provider, an unlink) leaves
    /// the index, unless the index names another device by then.
    #[tokio::test]
    async fn a_token_given_up_leaves_the_index_only_while_it_is_the_devices() {
        let store = FaultyEngine::new().store(4).await;
        store
            .update_device("ann", "phone", registered("fcm", "T"))
            .await
            .unwrap();
        store
            .update_device("ann", "phone", registered("fcm", "U"))
            .await
            .unwrap();
        assert_eq!(
            holder_of(&store, "T").await,
            None,
            "renewed with a new token"
        );
        assert!(holder_of(&store, "U").await.is_some());
        assert!(store.unlink_device("ann", "phone", 10).await.unwrap());
        assert_eq!(holder_of(&store, "U").await, None, "unlinked");

        store
            .update_device("bob", "phone", registered("fcm", "V"))
            .await
            .unwrap();
        // A record from before the index, which holds V too (written as it was then).
        let mut batch = Batch::new();
        let legacy = DeviceRecord {
            push_provider: "fcm".into(),
            push_token: "V".into(),
            ..DeviceRecord::default()
        };
        batch.set(store.keys().device("cat", "phone"), legacy.encode_to_vec());
        store.kv().commit(batch).await.unwrap();
        let cat = store.device("cat", "phone").await.unwrap().unwrap();
        assert!(store.push_token_taken("cat", "phone", &cat).await.unwrap());
        let bob = store.device("bob", "phone").await.unwrap().unwrap();
        assert!(!store.push_token_taken("bob", "phone", &bob).await.unwrap());
        // Cat's registration ends: Bob's entry stays.
        store
            .update_device("cat", "phone", |record| {
                Some(DeviceRecord {
                    push_provider: String::new(),
                    push_token: String::new(),
                    ..record.cloned().unwrap_or_default()
                })
            })
            .await
            .unwrap();
        assert_eq!(
            holder_of(&store, "V").await.map(|h| h.user),
            Some("bob".into())
        );
    }

    /// Ann and Bob registered one token before the index (a shared phone). Bob's app registers
    /// it again at its next start: the token is indexed as his, and Ann's registration is
    /// taken.
    #[tokio::test]
    async fn registrations_from_before_the_index_join_it_when_an_app_registers_again() {
        let store = FaultyEngine::new().store(4).await;
        let mut batch = Batch::new();
        for user in ["ann", "bob"] {
            let legacy = DeviceRecord {
                push_provider: "fcm".into(),
                push_token: "T".into(),
                ..DeviceRecord::default()
            };
            batch.set(store.keys().device(user, "phone"), legacy.encode_to_vec());
        }
        store.kv().commit(batch).await.unwrap();
        let taken = |user: &'static str| {
            let store = &store;
            async move {
                let record = store.device(user, "phone").await.unwrap().unwrap();
                store
                    .push_token_taken(user, "phone", &record)
                    .await
                    .unwrap()
            }
        };
        assert!(
            !taken("ann").await && !taken("bob").await,
            "nothing indexed yet"
        );
        store
            .update_device("bob", "phone", registered("fcm", "T"))
            .await
            .unwrap();
        assert_eq!(
            holder_of(&store, "T").await,
            None,
            "an unchanged record is not indexed"
        );
        store
            .register_push_token("bob", "phone", registered("fcm", "T"))
            .await
            .unwrap();
        assert_eq!(
            holder_of(&store, "T").await.map(|h| h.user),
            Some("bob".into())
        );
        assert!(taken("ann").await && !taken("bob").await);
    }

    /// The notifier found Cat's registration from before the index taken by Bob, and drops
    /// it; but if Cat's app registered the token again in between, the token is Cat's now
    /// and the drop leaves it.
    #[tokio::test]
    async fn a_taken_registration_dropped_after_it_was_registered_again_stays() {
        let store = FaultyEngine::new().store(4).await;
        let mut batch = Batch::new();
        let legacy = DeviceRecord {
            push_provider: "fcm".into(),
            push_token: "V".into(),
            ..DeviceRecord::default()
        };
        for user in ["cat", "dan"] {
            batch.set(store.keys().device(user, "phone"), legacy.encode_to_vec());
        }
        store.kv().commit(batch).await.unwrap();
        store
            .update_device("bob", "phone", registered("fcm", "V"))
            .await
            .unwrap();
        let read = |user: &'static str| {
            let store = &store;
            async move { store.device(user, "phone").await.unwrap().unwrap() }
        };
        let (cat, dan) = (read("cat").await, read("dan").await);
        assert!(store.push_token_taken("cat", "phone", &cat).await.unwrap());
        // Dan's drop ends his registration; the index stays Bob's.
        assert!(
            store
                .drop_taken_push_token("dan", "phone", &dan)
                .await
                .unwrap()
        );
        assert_eq!(token_of(&store, "dan").await, "");
        assert_eq!(
            holder_of(&store, "V").await.map(|h| h.user),
            Some("bob".into())
        );
        // Cat's app registers again before the notifier drops what it read.
        store
            .register_push_token("cat", "phone", registered("fcm", "V"))
            .await
            .unwrap();
        assert!(
            !store
                .drop_taken_push_token("cat", "phone", &cat)
                .await
                .unwrap()
        );
        assert_eq!(token_of(&store, "cat").await, "V", "Cat keeps its token");
        assert_eq!(
            holder_of(&store, "V").await.map(|h| h.user),
            Some("cat".into())
        );
    }
}
