//! Reads the server's Prometheus `/metrics`.

use anyhow::Context;
use std::collections::BTreeMap;

/// Unlabelled samples of `/metrics`, by name.
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    /// `GET {http_base}/metrics`.
    pub async fn fetch(http_base: &str) -> anyhow::Result<Scrape> {
        let url = format!("{http_base}/metrics");
        let text = reqwest::get(&url)
            .await
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("GET {url}"))?;
        Ok(Scrape::parse(&text))
    }

    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.contains('{'))
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let name = parts.next()?;
                let value = parts.next()?.parse::<f64>().ok()?;
                Some((name.to_owned(), value))
            })
            .collect();
        Scrape(samples)
    }

    /// A sample; `_total` is tried too (counters).
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0
            .get(name)
            .or_else(|| self.0.get(&format!("{name}_total")))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_unlabelled_samples() {
        let scrape = Scrape::parse(
            "# HELP x y\ncourier_gateway_connections 12\ncourier_gateway_errors_total{code=\"x\"} 3\ncourier_process_resident_memory_bytes 1048576\n",
        );
        assert_eq!(scrape.get("courier_gateway_connections"), Some(12.0));
        assert_eq!(
            scrape.get("courier_process_resident_memory_bytes"),
            Some(1048576.0)
        );
        assert_eq!(scrape.get("courier_gateway_errors"), None);
    }
}
