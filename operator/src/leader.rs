//! Leading: the controllers run while this replica holds the leader Lease, and a shutdown
//! (SIGTERM on a rolling update or a node drain, SIGINT) releases it.
//!
//! On shutdown the controllers stop first (reconciliations under way finish, within
//! [`CONTROLLERS_STOP`]), then the Lease's watch channel is dropped, which makes
//! `kube-lease-manager` release the Lease (its holder cleared) before its task ends; that is
//! awaited for at most [`LEASE_RELEASE`]. The release comes after the controllers have
//! stopped, so that two replicas never write at once. The standby takes the Lease when it
//! next looks: `kube-lease-manager` has it sleep until the expiry it last read, so that is
//! within ~25 s of the release (the lease's 30 s less the 5 s before expiry at which the
//! leader renews), released or not; the release spares it a forced release and a random
//! wait of up to a second.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::LeaseManager;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long the controllers get to finish the reconciliations under way once shut down.
pub const CONTROLLERS_STOP: Duration = Duration::from_secs(15);

/// How long the Lease's release may take (one write and one read of the Lease).
pub const LEASE_RELEASE: Duration = Duration::from_secs(5);

/// The task of `LeaseManager::watch`.
pub type LeaseTask = JoinHandle<kube_lease_manager::Result<LeaseManager>>;

/// Why leading ended.
#[derive(Debug, thiserror::Error)]
pub enum LeadError {
    /// Another replica took the Lease (this one could not renew it in time).
    #[error("lost the leader Lease; exiting so that only the leader writes")]
    LostLease,
    /// The Lease's watch ended before this replica led.
    #[error("the leader Lease's watch ended: {0}")]
    LeaseWatch(String),
    /// The controllers stopped with no shutdown asked for.
    #[error("the controllers stopped")]
    ControllersStopped,
}

/// Whether this replica leads, asked of the Lease itself right before the controllers act on
/// the data plane (a shard move, a drain).
///
/// The Lease's watch ([`lead`]) tells a leader it lost the Lease only when `kube-lease-manager`
/// next reads it. A replica paused past its Lease's expiry (a stopped process, a frozen VM or
/// node, a runtime starved for longer than the lease) resumes with its controllers where they
/// were: without this check they would act at once on a sample taken before the pause, while
/// another replica leads and plans from its own (a shard moved twice in a cooldown, moved
/// onto a pod the new leader is evacuating, a pod drained that no longer leaves). Real ones
/// read the Lease ([`LeaseFence`]); tests pass fakes.
///
/// What it cannot fence: a pause between the read and the admin call it precedes (the admin
/// API takes no fencing token), a window of one API round trip rather than of the whole pause.
#[async_trait::async_trait]
pub trait Leadership: Send + Sync {
    /// `Ok` if this replica holds the Lease and its hold has not expired at `now_ms` (ms since
    /// the epoch).
    async fn confirm(&self, now_ms: u64) -> Result<(), NotLeader>;
}

/// Why this replica may not act as the leader now.
#[derive(Debug, thiserror::Error)]
pub enum NotLeader {
    /// The Lease could not be read: leading is not confirmed.
    #[error("the leader Lease could not be read: {0}")]
    Unread(#[from] kube::Error),
    /// Another replica holds the Lease, or none does.
    #[error(
        "the leader Lease is held by {}, not by this replica ({identity})",
        holder.as_deref().unwrap_or("no one")
    )]
    NotHeld {
        /// The Lease's holder, if any.
        holder: Option<String>,
        /// This replica's identity.
        identity: String,
    },
    /// This replica holds the Lease, but did not renew it in time: another may take it now.
    #[error("this replica's hold on the leader Lease expired {ago_ms} ms ago")]
    Expired {
        /// How long ago.
        ago_ms: u64,
    },
}

/// The leader Lease as a [`Leadership`]: read from the API server at each confirmation.
pub struct LeaseFence {
    leases: Api<Lease>,
    name: String,
    identity: String,
}

impl LeaseFence {
    /// The Lease `name` in `namespace`, which this replica holds as `identity` while it leads.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        LeaseFence {
            leases: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
        }
    }
}

#[async_trait::async_trait]
impl Leadership for LeaseFence {
    async fn confirm(&self, now_ms: u64) -> Result<(), NotLeader> {
        let spec = self.leases.get_opt(&self.name).await?.and_then(|l| l.spec);
        let spec = spec.unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Err(NotLeader::NotHeld {
                holder: spec.holder_identity,
                identity: self.identity.clone(),
            });
        }
        // As `kube-lease-manager` reads it: no renewal time or duration is expired.
        let renewed_ms = spec
            .renew_time
            .and_then(|t| u64::try_from(t.0.as_millisecond()).ok())
            .unwrap_or(0);
        let lasts_ms = spec
            .lease_duration_seconds
            .and_then(|d| u64::try_from(d).ok())
            .unwrap_or(0)
            .saturating_mul(1000);
        let expiry_ms = renewed_ms.saturating_add(lasts_ms);
        match expiry_ms > now_ms {
            true => Ok(()),
            false => Err(NotLeader::Expired {
                ago_ms: now_ms - expiry_ms,
            }),
        }
    }
}

/// Waits to lead, runs `controllers` while this replica holds the Lease, and returns `Ok`
/// once `shutdown` resolved, the controllers stopped and the Lease was released (or its
/// release timed out, logged). `leader` and `lease_task` come from `LeaseManager::watch`;
/// `controllers` is handed a future that resolves on shutdown, and must end soon after it
/// does.
pub async fn lead<C, F>(
    mut leader: watch::Receiver<bool>,
    lease_task: LeaseTask,
    controllers: C,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LeadError>
where
    C: FnOnce(watch::Receiver<bool>) -> F,
    F: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let became_leader = async {
        while !*leader.borrow_and_update() {
            leader
                .changed()
                .await
                .map_err(|e| LeadError::LeaseWatch(e.to_string()))?;
        }
        Ok(())
    };
    tokio::select! {
        led = became_leader => led?,
        () = &mut shutdown => {
            // A standby holds nothing: dropping the channel ends the Lease's task.
            release(leader, lease_task).await;
            return Ok(());
        }
    }
    let (stop, stopped) = watch::channel(false);
    let running = controllers(stopped);
    tokio::pin!(running);
    let lost = async {
        while *leader.borrow() {
            if leader.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = &mut running => {
            lease_task.abort();
            return Err(LeadError::ControllersStopped);
        }
        () = lost => {
            lease_task.abort();
            return Err(LeadError::LostLease);
        }
        () = &mut shutdown => {}
    }
    tracing::info!("shutting down: stopping the controllers, then releasing the Lease");
    let _ = stop.send(true);
    if tokio::time::timeout(CONTROLLERS_STOP, running)
        .await
        .is_err()
    {
        tracing::warn!(
            after = ?CONTROLLERS_STOP,
            "the controllers did not stop in time; releasing the Lease anyway"
        );
    }
    release(leader, lease_task).await;
    Ok(())
}

/// Drops the Lease's watch channel, so that its task releases the Lease, and waits for that
/// at most [`LEASE_RELEASE`].
async fn release(leader: watch::Receiver<bool>, lease_task: LeaseTask) {
    drop(leader);
    match tokio::time::timeout(LEASE_RELEASE, lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!("released the leader Lease"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader Lease failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the leader Lease's task failed"),
        Err(_) => tracing::warn!(
            after = ?LEASE_RELEASE,
            "releasing the leader Lease timed out; the standby takes over when it expires"
        ),
    }
}

/// A future that resolves on SIGTERM or SIGINT; the handlers are installed at once (a
/// process that could not hear its shutdown would be killed without releasing the Lease).
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM"),
            _ = interrupt.recv() => tracing::info!("SIGINT"),
        }
    })
}
