//! The progress bar shown while a scenario runs (hidden when stderr is not a terminal or with
//! `--no-progress`).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::{Duration, Instant};

/// A bar over `len` units (seconds, connections, devices...).
pub fn bar(len: u64, unit: &str, hidden: bool) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if hidden {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let template =
        format!("{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The measured phase of a scenario: waits for `start`, then shows a bar over `duration` whose
/// message, `message(elapsed seconds)`, is refreshed four times a second; returns the bar once
/// the phase is over.
pub async fn timed_phase(
    start: Instant,
    duration: Duration,
    hidden: bool,
    message: impl Fn(f64) -> String,
) -> ProgressBar {
    tokio::time::sleep_until(start.into()).await;
    let bar = bar(duration.as_secs().max(1), "s", hidden);
    let end = start + duration;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250).min(end - Instant::now())).await;
        bar.set_position(start.elapsed().as_secs());
        bar.set_message(message(start.elapsed().as_secs_f64().max(1e-3)));
    }
    bar
}
