//! `--json`: one JSON document per run on stdout, whatever happened, that a
//! monitor can parse; the human lines stay on stderr.

use crate::bed::*;
use serde_json::Value;

/// The run's stdout, parsed: it must be exactly one JSON document.
#[track_caller]
fn document(out: &Output) -> Value {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{out}"))
}

/// The report of the pair whose source label ends with `ds`.
#[track_caller]
fn dataset<'a>(doc: &'a Value, ds: &str) -> &'a Value {
    doc["datasets"]
        .as_array()
        .expect("datasets is an array")
        .iter()
        .find(|d| d["source"].as_str().is_some_and(|s| s.ends_with(ds)))
        .unwrap_or_else(|| panic!("no report for {ds}: {doc}"))
}

#[test]
fn json_reports_every_dataset_of_a_partly_failed_recursive_run() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("json"), bed.ds_b("json"));
    create_dataset_with_data(&src, &[("a.bin", 64 << 10)]);
    create_dataset_with_data(&format!("{src}/good"), &[("g.bin", 64 << 10)]);
    create_dataset_with_data(&format!("{src}/bad"), &[("b.bin", 64 << 10)]);
    snapshot(&format!("{src}/good"), "first");
    let target = remote(&bed.host_b, &dst);
    resync(&["-r", &src, &target]).assert_success();

    // The target's copy of bad diverges; good gets new data.
    snapshot(&format!("{dst}/bad"), "rogue");
    write_files(&format!("{src}/good"), &[("g2.bin", 256 << 10)]);
    let out = resync(&["-r", "--json", &src, &target]);
    assert_eq!(out.code(), Some(1), "{out}");
    let doc = document(&out);
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["exit_status"], 1);
    assert_eq!(doc["error"], Value::Null);
    assert_eq!(doc["totals"]["datasets"], 3, "{doc}");
    assert_eq!(doc["totals"]["failed"], 1, "{doc}");
    assert_eq!(doc["totals"]["replicated"], 2, "{doc}");
    let good = dataset(&doc, "/good");
    assert_eq!(good["status"], "replicated");
    assert!(good["bytes"].as_u64().unwrap() > 256 << 10, "{good}");
    assert!(good["bytes_per_second"].as_f64().unwrap() > 0.0, "{good}");
    assert!(good["duration_seconds"].as_f64().is_some(), "{good}");
    assert_eq!(good["resumed"], false);
    assert_eq!(good["chunks"], Value::Null);
    let sync = good["last_snapshot"].as_str().unwrap();
    assert!(sync.starts_with("resync_"), "{good}");
    // One incremental from the last run's sync snapshot: it is the first and last.
    assert_eq!(good["first_snapshot"], sync);
    assert!(
        snapshots(&format!("{dst}/good"))
            .iter()
            .any(|(n, _)| n == sync),
        "the reported snapshot is on the target"
    );
    let bad = dataset(&doc, "/bad");
    assert_eq!(bad["status"], "failed");
    assert_eq!(bad["bytes"], 0);
    assert!(
        bad["error"].as_str().unwrap().contains("rogue"),
        "the error names the target's snapshot: {bad}"
    );
    // The human lines went to stderr.
    assert!(out.stderr.contains("1 of 3 datasets failed"), "{out}");
    destroy(&src);
    destroy(&dst);
}

#[test]
fn json_reports_chunks_and_up_to_date_runs() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("jsonck"), bed.ds_b("jsonck"));
    create_dataset_with_data(&src, &[("a.bin", 3 << 20)]);
    snapshot(&src, "s1");
    snapshot(&src, "s2");
    let target = remote(&bed.host_b, &dst);
    let out = resync(&[
        "--json",
        "--no-sync-snap",
        "--chunked",
        "--chunk-size=1M",
        &src,
        &target,
    ]);
    out.assert_success();
    let doc = document(&out);
    assert_eq!(doc["exit_status"], 0);
    let d = dataset(&doc, &src);
    assert_eq!(d["status"], "replicated", "{d}");
    assert_eq!(d["first_snapshot"], "s1");
    assert_eq!(d["last_snapshot"], "s2");
    assert!(d["chunks"].as_u64().unwrap() >= 3, "{d}");
    assert_eq!(d["resent_bytes"], 0);
    assert_eq!(
        doc["totals"]["bytes"], d["bytes"],
        "one dataset: totals are its own"
    );
    assert_replica(&src, &dst);

    let out = resync(&["--json", "--no-sync-snap", &src, &target]);
    out.assert_success();
    let doc = document(&out);
    let d = dataset(&doc, &src);
    assert_eq!(d["status"], "up_to_date", "{d}");
    assert_eq!(d["bytes"], 0);
    assert_eq!(d["first_snapshot"], Value::Null);
    assert_eq!(doc["totals"]["up_to_date"], 1);

    // A run that fails as a whole (exit 2) still writes its document.
    let out = resync(&[
        "--json",
        "--no-sync-snap",
        &format!("{src}/nonexistent"),
        &target,
    ]);
    assert_eq!(out.code(), Some(2), "{out}");
    let doc = document(&out);
    assert_eq!(doc["exit_status"], 2);
    assert!(
        doc["error"].as_str().unwrap().contains("does not exist"),
        "{doc}"
    );
    destroy(&src);
    destroy(&dst);
}
