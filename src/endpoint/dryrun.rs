//! `--dry-run` as a wrapper (rustic's DryRunBackend): [`DryRun`] implements
//! [`Changes`] for an endpoint by printing what it would do and recording
//! it, and never runs a command that changes a pool. Reads still go to the
//! real endpoint, so a dry run plans from the real state. A snapshot it
//! "took" is remembered so the planner sees it (see [`Changes::pending`]).

use std::sync::Mutex;

use crate::sys::Unpoisoned;
use anyhow::Result;

use super::{Changes, Taken, ZfsHost};
use crate::zfs::{Dataset, Snapshot};

/// Prints and records every change instead of making it.
pub struct DryRun<'e, 'a> {
    inner: &'e ZfsHost<'a>,
    /// What would have been done, in order (for tests and the summary).
    done: Mutex<Vec<String>>,
    /// Snapshots "taken": (dataset, name).
    taken: Mutex<Vec<(String, String)>>,
}

impl<'e, 'a> DryRun<'e, 'a> {
    pub fn new(inner: &'e ZfsHost<'a>) -> DryRun<'e, 'a> {
        DryRun {
            inner,
            done: Mutex::new(Vec::new()),
            taken: Mutex::new(Vec::new()),
        }
    }

    /// The changes that would have been made, as printed.
    #[cfg(test)]
    pub fn recorded(&self) -> Vec<String> {
        self.done.locked().clone()
    }

    fn would(&self, line: String) {
        println!("{line}");
        self.done.locked().push(line);
    }
}

impl Changes for DryRun<'_, '_> {
    fn set_property(&self, ds: &Dataset, prop: &str, value: &str) -> Result<()> {
        self.would(format!(
            "would set {prop}={value} on {}",
            self.inner.label(ds)
        ));
        Ok(())
    }

    fn snapshot(&self, ds: &Dataset, name: &str) -> Result<Taken> {
        self.would(format!("would snapshot {}@{name}", self.inner.label(ds)));
        self.taken.locked().push((ds.to_string(), name.to_string()));
        Ok(Taken::Created)
    }

    fn snapshot_all(
        &self,
        _: &Dataset,
        datasets: &[Dataset],
        _: bool,
        name: &str,
    ) -> Result<Vec<Result<Taken>>> {
        Ok(datasets.iter().map(|ds| self.snapshot(ds, name)).collect())
    }

    fn pending(&self, ds: &Dataset) -> Vec<Snapshot> {
        self.taken
            .locked()
            .iter()
            .filter(|(d, _)| d == ds.as_str())
            .map(|(_, name)| Snapshot {
                name: name.clone(),
                guid: 0,
                createtxg: u64::MAX,
            })
            .collect()
    }

    fn hold(&self, ds: &Dataset, snap: &str, tag: &str) -> Result<()> {
        self.would(format!(
            "would hold {}@{snap} as {tag}",
            self.inner.label(ds)
        ));
        Ok(())
    }

    fn release(&self, ds: &Dataset, snap: &str, tag: &str) -> Result<()> {
        self.would(format!(
            "would release hold {tag} on {}@{snap}",
            self.inner.label(ds)
        ));
        Ok(())
    }

    fn bookmark(&self, ds: &Dataset, snap: &str, bookmark: &str) -> Result<()> {
        self.would(format!(
            "would bookmark {}@{snap} as #{bookmark}",
            self.inner.label(ds)
        ));
        Ok(())
    }

    fn destroy_bookmark(&self, ds: &Dataset, bookmark: &str) -> Result<()> {
        self.would(format!(
            "would destroy bookmark {}#{bookmark}",
            self.inner.label(ds)
        ));
        Ok(())
    }

    fn destroy_snapshot(&self, ds: &Dataset, snap: &str, _: Option<&str>) -> Result<()> {
        self.would(format!("would destroy {}@{snap}", self.inner.label(ds)));
        Ok(())
    }

    fn destroy_snapshot_tree(&self, root: &Dataset, snap: &str) -> Result<()> {
        self.would(format!(
            "would destroy @{snap} of {} and of each dataset below it",
            self.inner.label(root)
        ));
        Ok(())
    }

    fn destroy_recursive(&self, ds: &Dataset) -> Result<()> {
        self.would(format!(
            "would destroy {} and everything below it",
            self.inner.label(ds)
        ));
        Ok(())
    }

    fn rollback(&self, ds: &Dataset, snap: &str) -> Result<()> {
        self.would(format!(
            "would roll {} back to @{snap}",
            self.inner.label(ds)
        ));
        Ok(())
    }

    fn abort_partial(&self, ds: &Dataset) -> Result<()> {
        self.would(format!(
            "would discard the partial receive on {}",
            self.inner.label(ds)
        ));
        Ok(())
    }
}
