//! `--preserve-properties` and `--preserve-recordsize`, as syncoid 2.3 does
//! them: which source properties (every locally set one but those it never
//! copies, or a filesystem's recordsize) and how they land on the target:
//! set locally, through `zfs receive -o PROP=VALUE` on every receive. A
//! target whose `zfs receive` has no `-o` (zfs-fuse) gets them with
//! `zfs set` once the pair is up to date, and the run says so once.

use anyhow::Result;

use super::Run;
use crate::cli::Preserve;
use crate::zfs::Dataset;

impl Run<'_> {
    /// The properties of `src` to set on its target.
    fn preserved_properties(&self, src: &Dataset) -> Result<Vec<(String, String)>> {
        match self.cfg.preserve {
            Preserve::Nothing => Ok(Vec::new()),
            Preserve::Properties => self.src.local_properties(src),
            Preserve::Recordsize => {
                let props = self.src.properties(src, &["type", "recordsize"])?;
                let is_fs = props.iter().any(|(p, v)| p == "type" && v == "filesystem");
                Ok(props
                    .into_iter()
                    .filter(|(p, _)| is_fs && p == "recordsize")
                    .collect())
            }
        }
    }

    /// The options of a receive from `src`: `--recvoptions`, then `-o
    /// PROP=VALUE` for each preserved property where the target's receive
    /// takes them.
    pub(super) fn receive_options(&self, src: &Dataset) -> Result<Vec<String>> {
        let mut options = self.cfg.recv_options.clone();
        if self.dst.caps.receive_sets_properties() {
            for (prop, value) in self.preserved_properties(src)? {
                options.push("-o".into());
                options.push(format!("{prop}={value}"));
            }
        }
        Ok(options)
    }

    /// Says once per run when preserved properties are set after the receive.
    pub(super) fn announce_preserve_fallback(&self) {
        if self.cfg.preserve != Preserve::Nothing && !self.dst.caps.receive_sets_properties() {
            self.ui.info(&format!(
                "the target's ZFS on {} has no zfs receive -o: setting the preserved \
                 properties with zfs set after each dataset is up to date",
                self.dst.host().label()
            ));
        }
    }

    /// Where the target's receive cannot set them: `zfs set` each preserved
    /// property on `dst` (locally, as `receive -o` would). Failures warn:
    /// the data is already safe.
    pub(super) fn set_preserved_properties(&self, src: &Dataset, dst: &Dataset) {
        if self.cfg.preserve == Preserve::Nothing || self.dst.caps.receive_sets_properties() {
            return;
        }
        let props = match self.preserved_properties(src) {
            Ok(props) => props,
            Err(e) => {
                self.ui.warn(&format!(
                    "cannot read the properties of {} to preserve: {e:#}",
                    self.src.label(src)
                ));
                return;
            }
        };
        for (prop, value) in props {
            if let Err(e) = self.dst_changes.set_property(dst, &prop, &value) {
                self.ui.warn(&format!(
                    "cannot set {prop}={value} on {}: {e:#}",
                    self.dst.label(dst)
                ));
            }
        }
    }
}
