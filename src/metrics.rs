//! Metrics in the Prometheus text format, served at `/metrics` by the
//! admin API. Counters and histograms are recorded where things happen
//! (the event log, the spool writer, the SMTP server); gauges that
//! describe the present — queue depth, associations open, cluster
//! membership and group owners — are read from published state at each
//! scrape, so a destination or member that went away never lingers.
//! Every metric is documented in README.md ("Metrics").

use std::fmt::Write;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Record from now on (once per process; later calls return the same
/// handle). None if another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0,
            ];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("mtad_spool_fsync_seconds".into()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("mtad_spool_commit_batch".into()),
                        &sizes,
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(e) => {
                    tracing::error!(error = %e, "metrics disabled");
                    return None;
                }
            };
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => Some(handle),
                Err(e) => {
                    tracing::error!(error = %e, "metrics disabled");
                    None
                }
            }
        })
        .as_ref()
}

/// The recorded metrics, rendered (empty if none are recorded).
pub fn render() -> String {
    match HANDLE.get().and_then(|h| h.as_ref()) {
        Some(h) => {
            // Histograms fold their samples in here; a scrape is often enough.
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

/// A message was accepted.
pub fn received() {
    counter!("mtad_received_total").increment(1);
}

/// A recipient's delivery attempt ended as `event` (the event log's
/// name for it: "delivered", "deferred", ...) at `destination`.
pub fn recipient(event: &str, destination: &str) {
    let name = match event {
        "delivered" => "mtad_delivered_total",
        "deferred" => "mtad_deferred_total",
        "bounced" => "mtad_bounced_total",
        "expired" => "mtad_expired_total",
        _ => return,
    };
    counter!(name, "destination" => destination.to_string()).increment(1);
}

/// An association opened, was renegotiated or closed (`event` as the
/// event log names it), for `reason`.
pub fn association(event: &str, destination: &str, reason: &str) {
    let name = match event {
        "association_opened" => "mtad_associations_opened_total",
        "association_closed" => "mtad_associations_closed_total",
        "association_renegotiated" => "mtad_associations_renegotiated_total",
        _ => return,
    };
    let labels = [
        ("destination", destination.to_string()),
        ("reason", reason.to_string()),
    ];
    counter!(name, &labels).increment(1);
}

/// The spool made a batch of `records` durable with one fsync taking
/// `fsync`.
pub fn spool_commit(records: usize, fsync: Duration) {
    histogram!("mtad_spool_commit_batch").record(records as f64);
    histogram!("mtad_spool_fsync_seconds").record(fsync.as_secs_f64());
}

/// The spool's files hold `bytes` now.
pub fn spool_bytes(bytes: u64) {
    gauge!("mtad_spool_bytes").set(bytes as f64);
}

/// A shadow copy of another node's message was made durable here.
pub fn shadow_stored() {
    counter!("mtad_shadow_copies_stored_total").increment(1);
}

/// A copy of a message accepted here was made (`"stored"`) on another
/// member, or could not be (`"failed"`).
pub fn shadow_sent(outcome: &'static str) {
    counter!("mtad_shadow_copies_sent_total", "outcome" => outcome).increment(1);
}

/// Messages accepted here with fewer copies than `[spool] replicas`.
pub fn underreplicated(messages: usize) {
    gauge!("mtad_queue_underreplicated").set(messages as f64);
}

/// An SMTP session began (`+1`) or ended (`-1`).
pub fn smtp_session(delta: i8) {
    if delta > 0 {
        counter!("mtad_smtp_sessions_total").increment(1);
        gauge!("mtad_smtp_sessions_open").increment(1.0);
    } else {
        gauge!("mtad_smtp_sessions_open").decrement(1.0);
    }
}

/// This node refused a cluster link, for `reason` (a refusal kind, or
/// `forged` for a frame that failed authentication).
pub fn cluster_link_refused(reason: &'static str) {
    counter!("mtad_cluster_link_refusals_total", "reason" => reason).increment(1);
}

/// Message bodies being received or stored took (or, negative, gave
/// back) `bytes`.
pub fn smtp_body_memory(bytes: f64) {
    gauge!("mtad_smtp_body_memory_bytes").increment(bytes);
}

/// The server sent a reply starting with `text` (its code's class).
pub fn smtp_reply(text: &str) {
    let class = match text.as_bytes().first() {
        Some(b'2') => "2xx",
        Some(b'3') => "3xx",
        Some(b'4') => "4xx",
        Some(b'5') => "5xx",
        _ => return,
    };
    counter!("mtad_smtp_replies_total", "class" => class).increment(1);
}

/// Gauges of the present, written at scrape time in the text format.
#[derive(Default)]
pub struct Present {
    out: String,
    declared: Vec<&'static str>,
}

impl Present {
    /// One sample of gauge `name` (declared with `help` on first use).
    pub fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample("gauge", name, help, labels, value)
    }

    /// One sample of a counter kept elsewhere (in the replicated state).
    pub fn counter(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample("counter", name, help, labels, value)
    }

    fn sample(
        &mut self,
        kind: &str,
        name: &'static str,
        help: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        if !self.declared.contains(&name) {
            self.declared.push(name);
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", pairs.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_gauges_declare_once_and_escape_labels() {
        let mut p = Present::default();
        p.gauge("mtad_x", "An x.", &[("d", "a\"b")], 2.0);
        p.gauge("mtad_x", "An x.", &[], 3.5);
        assert_eq!(
            p.finish(),
            "# HELP mtad_x An x.\n# TYPE mtad_x gauge\nmtad_x{d=\"a\\\"b\"} 2\nmtad_x 3.5\n"
        );
    }
}
