//! [`BackgroundLoops`]: the owner of a node's background loops (fanout workers, the outbox
//! clearer, the receipt relay, the notifier, retention, the media sweeper, the free-space watch),
//! so that a node can drain, hand a shard off and stop cleanly. Nothing in Courier spawns a
//! detached loop: a role's `start` takes the owner and spawns its loops into it.
//!
//! - **Stopping.** Every loop is handed a [`CancellationToken`] and decides where it may stop:
//!   most stop at any await (`token.run_until_cancelled(..)`), some finish the step in progress
//!   first (the notifier's pass) or the work queued to them (the outbox clearer).
//!   [`BackgroundLoops::shutdown`] cancels the token and waits for every loop until a deadline;
//!   loops still running then are aborted and named in the [`Shutdown`] report and the log.
//!   Dropping the owner aborts whatever still runs.
//! - **Failure policy.** A loop runs until it is cancelled. One that panics, or returns before it
//!   was cancelled, is logged at `error` and started again (by the same closure, with a fresh
//!   future) after a delay that doubles from [`RestartPolicy::first_delay`]. A loop that fails
//!   more than [`RestartPolicy::budget`] times within [`RestartPolicy::window`] is not started
//!   again: the owner reports it through [`BackgroundLoops::failed`], and the node stops (drains
//!   and exits non-zero, so that its supervisor restarts it from a clean state). Each role's
//!   `start` says why a restart of its loops is safe.
//!
//! # Why a `JoinSet` (and not `TaskTracker`)
//!
//! `tokio_util::task::TaskTracker` only waits. The shutdown must also name the loops that
//! overran the deadline and abort them, and dropping the owner must not leave loops behind: a
//! [`JoinSet`] gives task ids (mapped to loop names), `abort_all`, and aborts its tasks when
//! dropped. Loops live as long as the node, so nothing has to reap finished tasks meanwhile.
//!
//! # Example
//!
//! ```
//! use courier_core::loops::BackgroundLoops;
//! use std::time::Duration;
//!
//! # #[tokio::main] async fn main() {
//! let loops = BackgroundLoops::new();
//! loops.spawn("ticker", |cancel| async move {
//!     let tick = async {
//!         loop {
//!             tokio::time::sleep(Duration::from_secs(1)).await;
//!         }
//!     };
//!     cancel.run_until_cancelled(tick).await;
//! });
//! let report = loops
//!     .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
//!     .await;
//! assert!(report.is_clean());
//! # }
//! ```

use futures::FutureExt;
use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
pub use tokio_util::sync::CancellationToken;

/// When a failed loop is started again, and when the owner gives up on it.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Wait before the first restart; it doubles with each failure within `window`.
    pub first_delay: Duration,
    /// Longest wait before a restart.
    pub max_delay: Duration,
    /// Failures tolerated within `window`; one more and the loop is given up (the node stops).
    pub budget: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    /// Restarts after 0.1 s, 0.2 s, ... at most 10 s; the sixth failure within a minute gives
    /// up (about 3 s after the first when a loop fails at once every time).
    fn default() -> Self {
        Self {
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            budget: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// What [`BackgroundLoops::shutdown`] saw: every name in it has been logged at `error`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// Loops still running at the deadline (aborted).
    pub overran: Vec<String>,
    /// Loops that panicked while stopping.
    pub panicked: Vec<String>,
}

impl Shutdown {
    /// Every loop stopped by itself, in time.
    pub fn is_clean(&self) -> bool {
        self.overran.is_empty() && self.panicked.is_empty()
    }
}

/// How one supervised loop ended.
enum Ended {
    /// Cancelled, and it returned.
    Stopped,
    /// Cancelled, and it panicked on its way out.
    PanickedStopping,
    /// Failed past its restart budget.
    GaveUp,
}

struct Running {
    tasks: JoinSet<Ended>,
    names: HashMap<Id, String>,
}

/// The owner of a node's background loops: a [`CancellationToken`] and a [`JoinSet`] of
/// supervised loops (see the module documentation).
pub struct BackgroundLoops {
    cancel: CancellationToken,
    policy: RestartPolicy,
    /// The first loop given up, if any.
    gave_up: Arc<watch::Sender<Option<String>>>,
    running: Mutex<Running>,
}

impl Default for BackgroundLoops {
    fn default() -> Self {
        Self::new()
    }
}

impl BackgroundLoops {
    pub fn new() -> Self {
        Self::with_restart_policy(RestartPolicy::default())
    }

    pub fn with_restart_policy(policy: RestartPolicy) -> Self {
        Self {
            cancel: CancellationToken::new(),
            policy,
            gave_up: Arc::new(watch::Sender::new(None)),
            running: Mutex::new(Running {
                tasks: JoinSet::new(),
                names: HashMap::new(),
            }),
        }
    }

    /// Runs `run(token)` as the loop `name` until the token is cancelled, starting it again
    /// (with a new token clone) when it panics or returns early (module documentation).
    /// `run` should return soon after the token is cancelled. Must be called within a Tokio
    /// runtime.
    pub fn spawn<F, Fut>(&self, name: impl Into<String>, run: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let supervised = supervise(
            name.clone(),
            run,
            self.cancel.clone(),
            self.policy,
            self.gave_up.clone(),
        );
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let handle = running.tasks.spawn(supervised);
        running.names.insert(handle.id(), name);
    }

    /// Resolves with the name of the first loop given up after failing past its restart budget:
    /// the node must stop. Pending forever while none was.
    pub fn failed(&self) -> impl Future<Output = String> + Send + 'static {
        let mut gave_up = self.gave_up.subscribe();
        async move {
            let name = gave_up
                .wait_for(Option::is_some)
                .await
                .map(|name| name.clone().unwrap_or_default());
            match name {
                Ok(name) => name,
                // The sender lives as long as the owner and its loops.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// The first loop given up, if any (see [`BackgroundLoops::failed`]).
    pub fn given_up(&self) -> Option<String> {
        self.gave_up.borrow().clone()
    }

    /// Cancels every loop and waits for them until `deadline`; aborts those still running then.
    /// Loops spawned afterwards see their token already cancelled.
    pub async fn shutdown(&self, deadline: Instant) -> Shutdown {
        self.cancel.cancel();
        let Running {
            mut tasks,
            mut names,
        } = std::mem::replace(
            &mut *self.running.lock().unwrap_or_else(|e| e.into_inner()),
            Running {
                tasks: JoinSet::new(),
                names: HashMap::new(),
            },
        );
        let mut report = Shutdown::default();
        loop {
            let joined = match tokio::time::timeout_at(deadline, tasks.join_next_with_id()).await {
                Ok(Some(joined)) => joined,
                Ok(None) => break,
                Err(_) => {
                    let mut overran: Vec<String> = names.into_values().collect();
                    overran.sort();
                    for name in &overran {
                        tracing::error!(
                            task = name.as_str(),
                            "background loop still running at the shutdown deadline; aborted"
                        );
                    }
                    report.overran = overran;
                    tasks.shutdown().await;
                    break;
                }
            };
            let (id, ended) = match joined {
                Ok((id, ended)) => (id, ended),
                // The supervisor itself panicked (the loop's panics are caught inside it).
                Err(e) => {
                    let name = names.remove(&e.id()).unwrap_or_default();
                    tracing::error!(task = name.as_str(), error = %e, "background loop supervisor failed");
                    report.panicked.push(name);
                    continue;
                }
            };
            let name = names.remove(&id).unwrap_or_default();
            if matches!(ended, Ended::PanickedStopping) {
                report.panicked.push(name);
            }
        }
        report
    }
}

/// Runs one loop under `policy` until `cancel` (the body of its task).
async fn supervise<F, Fut>(
    name: String,
    mut run: F,
    cancel: CancellationToken,
    policy: RestartPolicy,
    gave_up: Arc<watch::Sender<Option<String>>>,
) -> Ended
where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut failures: VecDeque<Instant> = VecDeque::new();
    loop {
        // The call is inside the caught future too: a panic building the loop is a failure.
        let outcome = AssertUnwindSafe(async { run(cancel.clone()).await })
            .catch_unwind()
            .await;
        let panic = outcome.as_ref().err().map(panic_message);
        if cancel.is_cancelled() {
            return match panic {
                None => Ended::Stopped,
                Some(panic) => {
                    tracing::error!(
                        task = name.as_str(),
                        panic,
                        "background loop panicked while stopping"
                    );
                    Ended::PanickedStopping
                }
            };
        }
        let failure = match panic {
            Some(_) => "background loop panicked",
            None => "background loop ended before it was stopped",
        };
        let now = Instant::now();
        failures.push_back(now);
        while failures
            .front()
            .is_some_and(|&at| now.duration_since(at) > policy.window)
        {
            failures.pop_front();
        }
        if failures.len() > policy.budget {
            tracing::error!(
                task = name.as_str(),
                panic,
                failures = failures.len(),
                window = ?policy.window,
                "{failure}; it keeps failing, so it is given up and the node stops"
            );
            gave_up.send_if_modified(|first| {
                let unset = first.is_none();
                if unset {
                    *first = Some(name.clone());
                }
                unset
            });
            return Ended::GaveUp;
        }
        let doublings = (failures.len() - 1).min(16) as u32;
        let delay = policy
            .first_delay
            .saturating_mul(1 << doublings)
            .min(policy.max_delay);
        tracing::error!(
            task = name.as_str(),
            panic,
            restart_in = ?delay,
            "{failure}; restarting it"
        );
        if cancel
            .run_until_cancelled(tokio::time::sleep(delay))
            .await
            .is_none()
        {
            return Ended::Stopped;
        }
    }
}

/// The message a panic was raised with, when it is text.
fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not text)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const WAIT: Duration = Duration::from_secs(10);

    fn fast_restarts(budget: usize) -> RestartPolicy {
        RestartPolicy {
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(10),
            budget,
            window: Duration::from_secs(60),
        }
    }

    fn deadline() -> Instant {
        Instant::now() + WAIT
    }

    /// Waits (within [`WAIT`]) until `condition` holds.
    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + WAIT;
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn cancellation_stops_loops_and_shutdown_waits_for_their_last_step() {
        let loops = BackgroundLoops::new();
        let started = Arc::new(AtomicUsize::new(0));
        let cleaned_up = Arc::new(AtomicBool::new(false));
        for n in 0..3 {
            let (started, cleaned_up) = (started.clone(), cleaned_up.clone());
            loops.spawn(format!("loop {n}"), move |cancel| {
                let (started, cleaned_up) = (started.clone(), cleaned_up.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    cancel.cancelled().await;
                    if n == 0 {
                        // Work after cancellation (a last flush) that shutdown must wait for.
                        tokio::task::yield_now().await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        cleaned_up.store(true, Ordering::SeqCst);
                    }
                }
            });
        }
        until("every loop started", || started.load(Ordering::SeqCst) == 3).await;

        let report = loops.shutdown(deadline()).await;
        assert!(report.is_clean(), "{report:?}");
        assert!(
            cleaned_up.load(Ordering::SeqCst),
            "shutdown returned before a loop finished"
        );
        assert_eq!(
            started.load(Ordering::SeqCst),
            3,
            "a stopped loop was started again"
        );
    }

    #[tokio::test]
    async fn a_loop_that_ignores_cancellation_is_reported_and_aborted_at_the_deadline() {
        let loops = BackgroundLoops::new();
        let dropped = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicBool::new(false));
        {
            let (dropped, running) = (dropped.clone(), running.clone());
            loops.spawn("stubborn", move |_cancel| {
                let guard = SetOnDrop(dropped.clone());
                let running = running.clone();
                async move {
                    let _guard = guard;
                    running.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
            });
        }
        loops.spawn("polite", |cancel| async move { cancel.cancelled().await });
        until("the stubborn loop runs", || running.load(Ordering::SeqCst)).await;

        let report = loops
            .shutdown(Instant::now() + Duration::from_millis(50))
            .await;
        assert_eq!(report.overran, vec!["stubborn".to_string()]);
        assert!(report.panicked.is_empty());
        assert!(
            dropped.load(Ordering::SeqCst),
            "the overrunning loop was not aborted"
        );
    }

    #[tokio::test]
    async fn a_panicking_loop_is_restarted_and_given_up_past_its_budget() {
        let loops = BackgroundLoops::with_restart_policy(fast_restarts(3));
        let runs = Arc::new(AtomicUsize::new(0));
        {
            let runs = runs.clone();
            loops.spawn("doomed", move |_cancel| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    panic!("the loop broke");
                }
            });
        }
        let failed = tokio::time::timeout(WAIT, loops.failed())
            .await
            .expect("the failure is reported");
        assert_eq!(failed, "doomed");
        assert_eq!(loops.given_up().as_deref(), Some("doomed"));
        // The first run and one restart per failure the budget allows.
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        assert!(loops.shutdown(deadline()).await.is_clean());
    }

    #[tokio::test]
    async fn a_loop_that_panics_once_is_restarted_and_the_node_keeps_running() {
        let loops = BackgroundLoops::with_restart_policy(fast_restarts(3));
        let runs = Arc::new(AtomicUsize::new(0));
        {
            let runs = runs.clone();
            loops.spawn("flaky", move |cancel| {
                let runs = runs.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("first run breaks");
                    }
                    cancel.cancelled().await;
                }
            });
        }
        until("the loop was restarted", || {
            runs.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(loops.given_up(), None);
        assert!(loops.shutdown(deadline()).await.is_clean());
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_loop_that_returns_on_its_own_counts_as_a_failure() {
        let loops = BackgroundLoops::with_restart_policy(fast_restarts(1));
        loops.spawn("quitter", |_cancel| async {});
        let failed = tokio::time::timeout(WAIT, loops.failed()).await;
        assert_eq!(failed.as_deref(), Ok("quitter"));
    }

    #[tokio::test]
    async fn a_panic_while_stopping_is_reported() {
        let loops = BackgroundLoops::new();
        let running = Arc::new(AtomicBool::new(false));
        {
            let running = running.clone();
            loops.spawn("clumsy", move |cancel| {
                let running = running.clone();
                async move {
                    running.store(true, Ordering::SeqCst);
                    cancel.cancelled().await;
                    panic!("broke while stopping");
                }
            });
        }
        until("the loop runs", || running.load(Ordering::SeqCst)).await;
        let report = loops.shutdown(deadline()).await;
        assert_eq!(report.panicked, vec!["clumsy".to_string()]);
        assert!(report.overran.is_empty());
    }

    struct SetOnDrop(Arc<AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}
