//! Groups (chat role): create, add members, remove members. Every membership change is a
//! sequenced event of the group (one event per request, naming every user it changes), so
//! membership and messages share one order. The checks here answer clear errors early; the
//! sequenced commit decides again, at the event's place in the order (a user added twice by
//! racing requests is added once, an admin removed meanwhile adds no one). The member and
//! per-user group limits are checked here only, so racing requests may pass them by a few.
//!
//! **Rate.** Each change is an event that every member's devices get, as a message is: creating
//! a group, adding and removing others take a token of the user's send rate, as a send does
//! (`rate_limited` past it), and creating and adding are refused while storage is low, as sends
//! are. Leaving is never refused for either: it is one event per period of membership, and a
//! user must always be able to leave.

use crate::Chat;
use courier_core::auth::Identity;
use courier_core::error::ApiError;
use courier_core::sequencing::{PendingAppend, SequencerError};
use courier_proto::ids::is_group;
use courier_proto::{Event, EventPayload, MembershipChange, Sender, ids};
use courier_store::{Append, AppendKey, AppendRefused};

impl Chat {
    /// Queues a membership event, keyed by a fresh id: a commit whose outcome was unknown is
    /// retried without applying it twice.
    fn membership_append(
        &self,
        who: &Identity,
        conv: &str,
        payload: EventPayload,
    ) -> PendingAppend {
        let key = format!("membership:{}", hex::encode(rand::random::<[u8; 16]>()));
        self.sequencer.submit(Append {
            conversation_id: conv.to_owned(),
            sender: Sender {
                user: who.user.clone(),
                device: who.device.clone(),
            },
            key: AppendKey::Server(key),
            payload,
            create: None,
        })
    }

    /// Validates user ids, drops repeats, and checks the per-request bound.
    fn checked_users(&self, users: &[String]) -> Result<Vec<String>, ApiError> {
        if users.len() > self.limits.max_users_per_request {
            return Err(ApiError::bad_request(format!(
                "at most {} users per request",
                self.limits.max_users_per_request
            )));
        }
        let mut out: Vec<String> = Vec::with_capacity(users.len());
        for user in users {
            ids::user_id(user)?;
            if !out.contains(user) {
                out.push(user.clone());
            }
        }
        Ok(out)
    }

    async fn check_group_quota(&self, users: &[String]) -> Result<(), ApiError> {
        for user in users {
            if self.store.group_count(user).await? >= self.limits.max_groups_per_user {
                return Err(ApiError::forbidden(format!(
                    "{user} is already in {} groups, the most allowed",
                    self.limits.max_groups_per_user
                )));
            }
        }
        Ok(())
    }

    /// Creates a group with the caller as member and admin; returns its id once the
    /// `group_created` event is durable.
    pub async fn create_group(
        &self,
        who: &Identity,
        name: &str,
        members: &[String],
    ) -> Result<String, ApiError> {
        let length = name.chars().count();
        if length == 0 || length > self.limits.max_group_name {
            return Err(ApiError::bad_request(format!(
                "name must be 1 to {} characters",
                self.limits.max_group_name
            )));
        }
        // Every member's client shows the name, whoever chose it: a line break or a terminal's
        // escape sequence in it would act there, not be read, and a bidirectional override
        // would show it reordered (`\u{202e}gpj.exe` reads `exe.jpg`).
        if name.chars().any(|c| c.is_control() || is_bidi_override(c)) {
            return Err(ApiError::bad_request(
                "name must have no control characters (line breaks, tabs, escapes) or \
                 bidirectional embeddings, overrides and isolates (U+202A to U+202E, U+2066 to \
                 U+2069)",
            ));
        }
        let mut all = vec![who.user.clone()];
        all.extend(
            self.checked_users(members)?
                .into_iter()
                .filter(|u| *u != who.user),
        );
        if all.len() > self.limits.max_group_members {
            return Err(ApiError::bad_request(format!(
                "a group has at most {} members",
                self.limits.max_group_members
            )));
        }
        // Before the quota's reads (one per user): a refused request costs nothing more.
        self.check_user_rate(who)?;
        self.check_backpressure()?;
        self.check_group_quota(&all).await?;
        let conv = format!("g:{}", hex::encode(rand::random::<[u8; 16]>()));
        let payload = EventPayload::GroupCreated {
            name: name.to_owned(),
            members: all,
        };
        self.membership_append(who, &conv, payload).await?;
        Ok(conv)
    }

    /// Checks that `conv` is a group and `who` one of its admins.
    async fn check_admin(&self, who: &Identity, conv: &str) -> Result<(), ApiError> {
        self.check_member(conv, &who.user).await?;
        if !is_group(conv) {
            return Err(ApiError::bad_request(format!("{conv} is not a group")));
        }
        let admin = self
            .store
            .member(conv, &who.user)
            .await?
            .is_some_and(|m| m.admin);
        if !admin {
            return Err(ApiError::forbidden("only group admins may do this"));
        }
        Ok(())
    }

    /// Adds users (admins only) with one `member_added` event naming them all. Returns the
    /// users added (those already members are skipped; none: no event).
    pub async fn add_members(
        &self,
        who: &Identity,
        conv: &str,
        users: &[String],
    ) -> Result<Vec<String>, ApiError> {
        self.check_admin(who, conv).await?;
        let users = self.checked_users(users)?;
        // Before the members' and the quota's reads: a refused request costs nothing more.
        self.check_user_rate(who)?;
        let current = self.store.members(conv).await?;
        let new: Vec<String> = users.into_iter().filter(|u| !current.contains(u)).collect();
        if current.len() + new.len() > self.limits.max_group_members {
            return Err(ApiError::bad_request(format!(
                "a group has at most {} members",
                self.limits.max_group_members
            )));
        }
        if new.is_empty() {
            return Ok(new);
        }
        self.check_backpressure()?;
        self.check_group_quota(&new).await?;
        let payload = EventPayload::MemberAdded(MembershipChange::new(new.clone()));
        let outcome = match self.membership_append(who, conv, payload).await {
            Err(SequencerError::Refused(AppendRefused::NoChange)) => return Ok(Vec::new()),
            result => result?,
        };
        // The commit keeps only the users who were not members at its place in the order. It
        // landed, whatever this read does: one that fails answers with the users this request
        // found were not members (a racing add may have added some of them first), not with
        // an error that the client would retry or show as a failure.
        match self.store.event(conv, outcome.seq).await {
            Ok(Some(Event {
                payload: EventPayload::MemberAdded(added),
                ..
            })) => Ok(added.users),
            Ok(_) => Ok(Vec::new()),
            Err(error) => {
                tracing::warn!(
                    conv,
                    seq = outcome.seq,
                    %error,
                    "members were added, but who exactly could not be read back"
                );
                Ok(new)
            }
        }
    }

    /// Removes a member: an admin removes anyone, a member removes itself.
    pub async fn remove_member(
        &self,
        who: &Identity,
        conv: &str,
        user: &str,
    ) -> Result<(), ApiError> {
        ids::user_id(user)?;
        if user == who.user {
            self.check_member(conv, &who.user).await?;
            if !is_group(conv) {
                return Err(ApiError::bad_request(format!("{conv} is not a group")));
            }
        } else {
            self.check_admin(who, conv).await?;
            if !self.store.is_member(conv, user).await? {
                return Err(ApiError::not_found(format!(
                    "{user} is not a member of {conv}"
                )));
            }
            self.check_user_rate(who)?;
        }
        let payload = EventPayload::MemberRemoved(MembershipChange::new(vec![user.to_owned()]));
        let removal = match self.membership_append(who, conv, payload).await {
            Err(SequencerError::Refused(AppendRefused::NoChange)) => {
                return Err(ApiError::not_found(format!(
                    "{user} is not a member of {conv}"
                )));
            }
            result => result?,
        };
        // Typing and receipts go to the members the cache holds, which this node's fanout
        // brings up to date only as it passes the removal: loaded through it now, so that
        // nothing relayed after this answer reaches the removed user. The removal landed,
        // whatever this read does: one that fails has the cache forget the group, whose
        // members the next relay reads from the store, where the removal is.
        if let Err(error) = self.membership.members_at(conv, removal.seq).await {
            tracing::warn!(
                conv,
                seq = removal.seq,
                %error,
                "a member was removed; the membership cache forgets the group"
            );
            self.membership.forget(conv);
        }
        Ok(())
    }
}

/// Whether `c` is one of Unicode's explicit bidirectional embeddings, overrides or isolates
/// (U+202A to U+202E, U+2066 to U+2069): text after one is shown in another order than it is
/// stored. The directional marks (U+200E, U+200F, U+061C) reorder nothing and are taken.
fn is_bidi_override(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}
