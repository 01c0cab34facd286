//! `--json`: what a run did, as one JSON document on stdout for monitoring.
//! The orchestrator fills in one [`DatasetReport`] per dataset pair as it
//! finishes it (into a [`Reports`] shared by the run); `main` adds the run's
//! own error and exit status and prints [`to_json`]. The schema is in
//! README ("Output for monitoring"); its `version` changes when a field
//! changes meaning or goes away. Pure apart from the mutex.

use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::progress::{human_bytes, human_duration};
use crate::sys::Unpoisoned;

/// How one dataset pair ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Streams were received and verified.
    Replicated,
    /// Nothing needed sending.
    UpToDate,
    Failed,
    /// Not tried: its parent failed.
    Skipped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Replicated => "replicated",
            Status::UpToDate => "up_to_date",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// One dataset pair's result.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetReport {
    /// As resync labels them: `pool/ds` or `user@host:pool/ds`.
    pub source: String,
    pub target: String,
    pub status: Status,
    /// Stream bytes received by the target in this run.
    pub bytes: u64,
    pub duration: Duration,
    /// The first and last snapshot this run sent (names after `@`).
    pub first_snapshot: Option<String>,
    pub last_snapshot: Option<String>,
    /// An interrupted transfer was resumed (a resume token or a chunk
    /// session an earlier run left).
    pub resumed: bool,
    /// `--chunked`: chunks moved and bytes sent again after cuts.
    pub chunks: Option<u64>,
    pub resent_bytes: Option<u64>,
    pub error: Option<String>,
}

impl DatasetReport {
    /// A pair that ended in `status` before or without sending anything.
    pub fn bare(source: String, target: String, status: Status) -> DatasetReport {
        DatasetReport {
            source,
            target,
            status,
            bytes: 0,
            duration: Duration::ZERO,
            first_snapshot: None,
            last_snapshot: None,
            resumed: false,
            chunks: None,
            resent_bytes: None,
            error: None,
        }
    }

    fn to_value(&self) -> Value {
        let secs = self.duration.as_secs_f64();
        let rate = (self.bytes > 0 && secs > 0.0).then(|| (self.bytes as f64 / secs).round());
        json!({
            "source": self.source,
            "target": self.target,
            "status": self.status.as_str(),
            "bytes": self.bytes,
            "duration_seconds": round3(secs),
            "bytes_per_second": rate,
            "first_snapshot": self.first_snapshot,
            "last_snapshot": self.last_snapshot,
            "resumed": self.resumed,
            "chunks": self.chunks,
            "resent_bytes": self.resent_bytes,
            "error": self.error,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The reports of one run, in the order pairs finished.
#[derive(Debug, Default)]
pub struct Reports(Mutex<Vec<DatasetReport>>);

impl Reports {
    pub fn push(&self, report: DatasetReport) {
        self.0.locked().push(report);
    }

    pub fn take(&self) -> Vec<DatasetReport> {
        std::mem::take(&mut *self.0.locked())
    }

    /// A copy of the reports so far.
    pub fn copied(&self) -> Vec<DatasetReport> {
        self.0.locked().clone()
    }
}

/// The closing line of a run over several datasets, e.g. "41 datasets in
/// 2.1s: 40 replicated (3.20 MiB), 1 up to date"; failed and skipped
/// pairs are counted where there are any.
pub fn totals_line(datasets: &[DatasetReport], duration: Duration) -> String {
    let count = |s: Status| datasets.iter().filter(|d| d.status == s).count();
    let bytes: u64 = datasets.iter().map(|d| d.bytes).sum();
    let mut parts = vec![format!(
        "{} replicated ({})",
        count(Status::Replicated),
        human_bytes(bytes)
    )];
    parts.push(format!("{} up to date", count(Status::UpToDate)));
    for (status, what) in [(Status::Failed, "failed"), (Status::Skipped, "skipped")] {
        if count(status) > 0 {
            parts.push(format!("{} {what}", count(status)));
        }
    }
    format!(
        "{} datasets in {}: {}",
        datasets.len(),
        human_duration(duration),
        parts.join(", ")
    )
}

/// The run's document: its datasets, totals, the run-level error (one that
/// stopped the whole run, exit 2) and the exit status.
pub fn to_json(
    source: &str,
    target: &str,
    datasets: &[DatasetReport],
    duration: Duration,
    error: Option<&str>,
    exit_status: i32,
) -> String {
    let count = |s: Status| datasets.iter().filter(|d| d.status == s).count();
    let bytes: u64 = datasets.iter().map(|d| d.bytes).sum();
    let doc = json!({
        "version": 1,
        "resync_version": env!("CARGO_PKG_VERSION"),
        "source": source,
        "target": target,
        "datasets": datasets.iter().map(DatasetReport::to_value).collect::<Vec<_>>(),
        "totals": {
            "datasets": datasets.len(),
            "replicated": count(Status::Replicated),
            "up_to_date": count(Status::UpToDate),
            "failed": count(Status::Failed),
            "skipped": count(Status::Skipped),
            "bytes": bytes,
            "duration_seconds": round3(duration.as_secs_f64()),
        },
        "error": error,
        "exit_status": exit_status,
    });
    doc.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_totals_line_counts_each_outcome_and_the_bytes() {
        let mut done = DatasetReport::bare("a".into(), "b".into(), Status::Replicated);
        done.bytes = 3 << 20;
        let idle = DatasetReport::bare("a/c".into(), "b/c".into(), Status::UpToDate);
        let mut all = vec![done.clone(), done, idle];
        assert_eq!(
            totals_line(&all, Duration::from_millis(2100)),
            "3 datasets in 2.1s: 2 replicated (6.00 MiB), 1 up to date"
        );
        all.push(DatasetReport::bare("x".into(), "y".into(), Status::Failed));
        all.push(DatasetReport::bare(
            "x/z".into(),
            "y/z".into(),
            Status::Skipped,
        ));
        assert_eq!(
            totals_line(&all, Duration::from_secs(75)),
            "5 datasets in 1m15s: 2 replicated (6.00 MiB), 1 up to date, 1 failed, 1 skipped"
        );
    }

    use super::*;

    #[test]
    fn the_document_has_every_field_and_escapes_text() {
        let mut ok =
            DatasetReport::bare("tank/a".into(), "root@b:pool/a".into(), Status::Replicated);
        ok.bytes = 4096;
        ok.duration = Duration::from_millis(2000);
        ok.first_snapshot = Some("s1".into());
        ok.last_snapshot = Some("s3".into());
        ok.chunks = Some(2);
        ok.resent_bytes = Some(0);
        let mut bad =
            DatasetReport::bare("tank/a/b".into(), "root@b:pool/a/b".into(), Status::Failed);
        bad.error = Some("zfs said \"no\"\nand more".into());
        let text = to_json(
            "tank/a",
            "root@b:pool/a",
            &[ok, bad],
            Duration::from_secs(3),
            None,
            1,
        );
        assert!(!text.contains('\n'), "one line: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["exit_status"], 1);
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["totals"]["datasets"], 2);
        assert_eq!(v["totals"]["replicated"], 1);
        assert_eq!(v["totals"]["failed"], 1);
        assert_eq!(v["totals"]["bytes"], 4096);
        let d = &v["datasets"][0];
        assert_eq!(d["status"], "replicated");
        assert_eq!(d["bytes_per_second"], 2048.0);
        assert_eq!(d["first_snapshot"], "s1");
        assert_eq!(d["last_snapshot"], "s3");
        assert_eq!(d["chunks"], 2);
        assert_eq!(d["resumed"], false);
        let e = &v["datasets"][1];
        assert_eq!(e["status"], "failed");
        assert_eq!(e["error"], "zfs said \"no\"\nand more");
        assert_eq!(e["bytes_per_second"], Value::Null);
    }
}
