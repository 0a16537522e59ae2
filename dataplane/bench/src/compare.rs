//! `courier bench compare a.json b.json`: every metric of two runs side by side, with b/a.

use super::report::{Report, human};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The baseline result.
    pub a: PathBuf,
    /// The result to compare with it.
    pub b: PathBuf,
}

pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let a = Report::read_json(&args.a)?;
    let b = Report::read_json(&args.b)?;
    if a.scenario != b.scenario {
        eprintln!(
            "warning: comparing different scenarios ({} and {})",
            a.scenario, b.scenario
        );
    }
    print!("{}", table(&a, &b));
    Ok(())
}

/// The comparison table: metric, a, b, b/a (`-` when a is 0 or a side lacks the metric).
pub fn table(a: &Report, b: &Report) -> String {
    let (fa, fb) = (a.flat_metrics(), b.flat_metrics());
    let mut names: Vec<&String> = fa.keys().chain(fb.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = format!(
        "{:<40} {:>14} {:>14} {:>8}\n",
        format!("{} ({} vs {})", a.scenario, a.protocol, b.protocol),
        "a",
        "b",
        "b/a"
    );
    for name in names {
        let (va, vb) = (fa.get(name), fb.get(name));
        let show = |v: Option<&f64>| v.map_or("-".to_owned(), |v| human(*v));
        let ratio = match (va, vb) {
            (Some(x), Some(y)) if *x != 0.0 => format!("{:.3}", y / x),
            _ => "-".to_owned(),
        };
        out += &format!("{name:<40} {:>14} {:>14} {ratio:>8}\n", show(va), show(vb));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_per_metric() {
        let mut a = Report::default();
        let mut b = Report::default();
        a.metrics.insert("msgs_per_sec".into(), 1000.0);
        b.metrics.insert("msgs_per_sec".into(), 1500.0);
        b.metrics.insert("only_b".into(), 1.0);
        let table = table(&a, &b);
        assert!(table.contains("1.500"), "{table}");
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("only_b") && l.ends_with('-'))
        );
    }
}
