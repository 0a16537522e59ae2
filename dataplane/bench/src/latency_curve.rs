//! `latency-curve`: the latency-throughput curve in one command. The [`throughput`] scenario
//! runs once per offered rate, one rate after the other, each with its own users; the result
//! holds every run (`Report::runs`) and prints one line per rate.
//!
//! Runs do not overlap: [`throughput::run`] returns only after its drain (every sender has its
//! receipts, or `--drain-timeout` passed) and after its connections closed, so the next rate
//! starts on a server with nothing of the previous one in flight and needs no pause. A run that
//! did not drain in time reports its undelivered messages as lost, a correctness problem.
//!
//! Failure policy: correctness problems of any run make the sweep fail once every rate ran
//! (never timings); a run that cannot run at all (server gone, refused connections) ends the
//! sweep there, and the runs before it are still reported, with that failure as a problem.
//!
//! ```text
//! courier bench --data-dir D latency-curve --pairs 100 --rates 1000,2000,5000 --duration 10s
//! ```

use super::CommonArgs;
use super::report::{Report, human};
use super::throughput::{self, DEFAULT_WINDOW, PairOptions, ThroughputArgs};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct LatencyCurveArgs {
    /// Sender/receiver pairs (one direct conversation each), the same for every rate.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Offered rates, total messages per second (open loop), run in this order; each runs for
    /// `--duration`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,5000,10000,15000,20000"
    )]
    pub rates: Vec<f64>,
    #[command(flatten)]
    pub pair_options: PairOptions,
}

pub async fn run(common: &CommonArgs, args: LatencyCurveArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.pairs > 0, "--pairs must be at least 1");
    check_rates(&args.rates)?;
    let mut runs = Vec::with_capacity(args.rates.len());
    let mut failed = None;
    for (index, &rate) in args.rates.iter().enumerate() {
        eprintln!(
            "latency-curve: rate {} of {}: {} msgs/s for {}",
            index + 1,
            args.rates.len(),
            human(rate),
            humantime::format_duration(common.duration)
        );
        let throughput_args = ThroughputArgs {
            pairs: args.pairs,
            rate,
            window: DEFAULT_WINDOW, // unused: every rate is open loop
            pair_options: args.pair_options.clone(),
        };
        match throughput::run(common, throughput_args).await {
            Ok(report) => {
                report.print();
                runs.push(report);
            }
            Err(error) if runs.is_empty() => {
                return Err(error.context(format!("at {} msgs/s", human(rate))));
            }
            Err(error) => {
                // Keep what was measured: the report of the earlier rates is still written.
                failed = Some(format!(
                    "the sweep stopped at {} msgs/s, which could not run: {error:#}",
                    human(rate)
                ));
                break;
            }
        }
    }
    let mut report = combine(common, &args, runs);
    if let Some(failed) = failed {
        report.problem(failed);
    }
    Ok(report)
}

/// Offered rates must be open-loop rates (positive, finite), each listed once.
fn check_rates(rates: &[f64]) -> anyhow::Result<()> {
    anyhow::ensure!(!rates.is_empty(), "--rates needs at least one rate");
    for (i, rate) in rates.iter().enumerate() {
        anyhow::ensure!(
            rate.is_finite() && *rate > 0.0,
            "--rates: {rate} is not a rate in messages per second above 0"
        );
        anyhow::ensure!(
            !rates[..i].contains(rate),
            "--rates lists {} twice",
            human(*rate)
        );
    }
    Ok(())
}

/// The sweep's report: its parameters, the runs, their counts and errors summed (`drained` is
/// the number of runs that drained), and their problems named by rate.
fn combine(common: &CommonArgs, args: &LatencyCurveArgs, runs: Vec<Report>) -> Report {
    let mut report = Report::new("latency-curve", common);
    report.param("pairs", args.pairs);
    report.param("rates", args.rates.clone());
    report.param("duration_per_rate_secs", common.duration.as_secs_f64());
    report.param("body_bytes", args.pair_options.body_bytes);
    report.param(
        "push_provider",
        args.pair_options.push.push_provider.clone(),
    );
    for run in &runs {
        for (name, value) in &run.counts {
            *report.counts.entry(name.clone()).or_default() += value;
        }
        for (code, n) in &run.errors {
            *report.errors.entry(code.clone()).or_default() += n;
        }
        let rate = run.params.get("rate").and_then(|r| r.as_f64());
        for problem in &run.problems {
            let rate = rate.map_or("?".to_owned(), human);
            report.problem(format!("at {rate} msgs/s: {problem}"));
        }
    }
    report.runs = runs;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BenchArgs, Scenario};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> (CommonArgs, LatencyCurveArgs) {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .expect("valid arguments");
        match cli.bench.scenario {
            Scenario::LatencyCurve(a) => (cli.bench.common, a),
            other => panic!("parsed {other:?}"),
        }
    }

    fn run_at(rate: f64, lost: u64) -> Report {
        let mut run = Report::default();
        run.param("rate", rate);
        run.count("lost", lost);
        run.count("acked", 10);
        if lost > 0 {
            run.problem(format!("{lost} acknowledged messages were not delivered"));
        }
        run
    }

    #[test]
    fn defaults_are_the_issue_sweep() {
        let (_, args) = parse(&["latency-curve"]);
        assert_eq!(args.pairs, 100);
        assert_eq!(
            args.rates,
            [1000.0, 2000.0, 5000.0, 10000.0, 15000.0, 20000.0]
        );
    }

    #[test]
    fn rates_must_be_positive_and_distinct() {
        let (_, args) = parse(&["latency-curve", "--rates", "500,100"]);
        assert_eq!(args.rates, [500.0, 100.0]);
        assert!(check_rates(&args.rates).is_ok());
        assert!(check_rates(&[]).is_err());
        assert!(check_rates(&[100.0, 0.0]).is_err());
        assert!(check_rates(&[100.0, f64::INFINITY]).is_err());
        assert!(check_rates(&[100.0, 200.0, 100.0]).is_err());
    }

    #[test]
    fn a_loss_at_any_rate_is_a_problem_of_the_sweep() {
        let (common, args) = parse(&["latency-curve", "--rates", "100,200"]);
        let report = combine(&common, &args, vec![run_at(100.0, 0), run_at(200.0, 3)]);
        assert_eq!(report.counts["lost"], 3);
        assert_eq!(report.counts["acked"], 20);
        assert_eq!(report.problems.len(), 1);
        assert!(report.problems[0].starts_with("at 200 msgs/s: 3 "));
        assert_eq!(report.runs.len(), 2);
    }

    #[test]
    fn every_rate_is_comparable_and_tabled() {
        let (common, args) = parse(&["latency-curve", "--rates", "100,200"]);
        let report = combine(&common, &args, vec![run_at(100.0, 0), run_at(200.0, 0)]);
        let flat = report.flat_metrics();
        assert_eq!(flat["rate_100.count.acked"], 10.0);
        assert_eq!(flat["rate_200.count.lost"], 0.0);
        let table = report.runs_table();
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(
            table
                .lines()
                .nth(2)
                .unwrap()
                .trim_start()
                .starts_with("200.0")
        );
    }
}
