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
