//! Latency histograms and the figures a run reports.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microsecond latencies from 1 µs to 100 s at 3 significant digits.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant bounds are valid"))
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        self.record_us(latency.as_micros() as u64);
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Both come from the same constructor, so their bounds always agree.
        let _ = self.0.add(&other.0);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }
}

/// Whether a larger value of a metric is better; decides how the report reads ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub better: Better,
}

/// The figures one scenario produced against one server, in the order they are reported.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Metrics(pub Vec<Metric>);

impl Metrics {
    pub fn push(&mut self, name: impl Into<String>, value: f64, unit: &str, better: Better) {
        self.0.push(Metric { name: name.into(), value, unit: unit.to_owned(), better });
    }

    /// p50, p99 and max of a latency distribution, under one label.
    pub fn latencies(&mut self, label: &str, latencies: &Latencies) {
        if latencies.len() == 0 {
            return;
        }
        self.push(format!("{label} p50"), latencies.quantile_ms(0.50), "ms", Better::Lower);
        self.push(format!("{label} p99"), latencies.quantile_ms(0.99), "ms", Better::Lower);
        self.push(format!("{label} max"), latencies.max_ms(), "ms", Better::Lower);
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|m| m.name == name).map(|m| m.value)
    }
}
