//! Groups (chat role): create, add members, remove members. Every membership change is a
//! sequenced event of the group, so membership and messages share one order.

use crate::auth::Identity;
use crate::chat::{Chat, is_group};
use crate::error::ApiError;
use crate::sequencer::PendingAppend;
use courier_proto::{EventPayload, Sender, ids};
use courier_store::Append;

impl Chat {
    fn membership_append(
        &self,
        who: &Identity,
        conv: &str,
        payload: EventPayload,
    ) -> PendingAppend {
        self.sequencer.submit(Append {
            conversation_id: conv.to_owned(),
            sender: Sender {
                user: who.user.clone(),
                device: who.device.clone(),
            },
            client_msg_id: None,
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

    /// Adds users (admins only); one `member_added` event each. Returns the users added
    /// (those already members are skipped).
    pub async fn add_members(
        &self,
        who: &Identity,
        conv: &str,
        users: &[String],
    ) -> Result<Vec<String>, ApiError> {
        self.check_admin(who, conv).await?;
        let users = self.checked_users(users)?;
        let current = self.store.member_records(conv).await?;
        let new: Vec<String> = users
            .into_iter()
            .filter(|u| !current.iter().any(|(m, _)| m == u))
            .collect();
        if current.len() + new.len() > self.limits.max_group_members {
            return Err(ApiError::bad_request(format!(
                "a group has at most {} members",
                self.limits.max_group_members
            )));
        }
        self.check_group_quota(&new).await?;
        let pending: Vec<PendingAppend> = new
            .iter()
            .map(|user| {
                self.membership_append(who, conv, EventPayload::MemberAdded { user: user.clone() })
            })
            .collect();
        for append in pending {
            append.await?;
        }
        Ok(new)
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
            if self.store.member(conv, user).await?.is_none() {
                return Err(ApiError::not_found(format!(
                    "{user} is not a member of {conv}"
                )));
            }
        }
        let payload = EventPayload::MemberRemoved {
            user: user.to_owned(),
        };
        self.membership_append(who, conv, payload).await?;
        Ok(())
    }
}
