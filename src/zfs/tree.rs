//! One side's whole tree from one listing: `zfs get -Hp -r` of guid and
//! createtxg (and `receive_resume_token` where the ZFS has it) under a
//! root, parsed once into a per-dataset index of snapshots, bookmarks and
//! resume token. A recursive run lists each side once and plans every
//! dataset from this index, instead of listing each dataset (a remote
//! command, a round trip) several times. Parsing is linear in the listing
//! (plus the sort of each dataset's snapshots), so a dataset with thousands
//! of snapshots costs no quadratic work.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};

use super::{validate_short_name, zfs, Capabilities, Dataset, Snapshot};

/// What one listing shows of one dataset.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Ascending by createtxg (then name), as [`super::parse_snapshot_list`].
    pub snapshots: Vec<Snapshot>,
    /// Bookmarks (the name after `#`), ascending like snapshots.
    pub bookmarks: Vec<Snapshot>,
    /// `receive_resume_token`, when an interrupted resumable receive left one.
    pub resume_token: Option<String>,
}

/// Every file system and volume at or below a root, by name.
pub type Tree = BTreeMap<Dataset, TreeEntry>;

/// `zfs get -Hp -r [-t filesystem,volume,snapshot[,bookmark]] -o
/// name,property,value guid,createtxg[,receive_resume_token] ROOT`. Without
/// `-t` (zfs-fuse) `get -r` lists snapshots anyway.
pub fn list_tree_argv(root: &Dataset, caps: &Capabilities) -> Vec<String> {
    let mut argv = zfs(&["get", "-Hp", "-r"]);
    if caps.get_type_filter {
        let types = match caps.bookmarks {
            true => "filesystem,volume,snapshot,bookmark",
            false => "filesystem,volume,snapshot",
        };
        argv.extend(["-t".into(), types.into()]);
    }
    let props = match caps.resume_tokens {
        true => "guid,createtxg,receive_resume_token",
        false => "guid,createtxg",
    };
    argv.extend(["-o", "name,property,value", props, root.as_str()].map(String::from));
    argv
}

/// Parses the output of [`list_tree_argv`] for `root`. Every line must have
/// three tab-separated fields; names outside `root` are skipped; a snapshot
/// or bookmark needs a valid short name, exactly one numeric guid and one
/// createtxg, or the whole listing is refused (as the per-dataset parser).
pub fn parse_tree(root: &Dataset, stdout: &str) -> Result<Tree> {
    // Full snapshot or bookmark name -> (guid, createtxg).
    type Props = (Option<u64>, Option<u64>);
    let mut tree = Tree::new();
    let mut props: BTreeMap<(&str, char, &str), Props> = BTreeMap::new();
    for (n, line) in stdout.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, property, value] = fields[..] else {
            bail!(
                "unexpected line {} in the listing of {root}: {line:?} (want name, property and value separated by tabs)",
                n + 1
            );
        };
        let split = name.find(['@', '#']);
        let ds_name = split.map_or(name, |i| &name[..i]);
        if Dataset::parse(ds_name)
            .ok()
            .and_then(|ds| ds.relative_to(root).map(drop))
            .is_none()
        {
            continue;
        }
        let Some(i) = split else {
            let ds = Dataset::parse(ds_name)?;
            let entry = tree.entry(ds).or_default();
            if property == "receive_resume_token" && value != "-" && !value.is_empty() {
                entry.resume_token = Some(value.to_string());
            }
            continue;
        };
        let sep = name[i..].chars().next().unwrap_or('@');
        let kind = if sep == '#' { "bookmark" } else { "snapshot" };
        let short = &name[i + 1..];
        validate_short_name(kind, short)
            .with_context(|| format!("line {} of the listing of {root}", n + 1))?;
        let slot = match property {
            "guid" => 0,
            "createtxg" => 1,
            _ => continue,
        };
        let parsed: u64 = value.parse().map_err(|_| {
            anyhow!(
                "{kind} {name}: {property} is {value:?}, not a number (line {})",
                n + 1
            )
        })?;
        let entry = props.entry((ds_name, sep, short)).or_default();
        let slot = if slot == 0 {
            &mut entry.0
        } else {
            &mut entry.1
        };
        if slot.replace(parsed).is_some() {
            bail!("{kind} {name}: {property} listed twice");
        }
    }
    for ((ds_name, sep, short), (guid, createtxg)) in props {
        let (Some(guid), Some(createtxg)) = (guid, createtxg) else {
            bail!(
                "{ds_name}{sep}{short}: listing lacks its {}",
                if guid.is_none() { "guid" } else { "createtxg" }
            );
        };
        let entry = tree.entry(Dataset::parse(ds_name)?).or_default();
        let list = match sep {
            '#' => &mut entry.bookmarks,
            _ => &mut entry.snapshots,
        };
        list.push(Snapshot {
            name: short.to_string(),
            guid,
            createtxg,
        });
    }
    for entry in tree.values_mut() {
        for list in [&mut entry.snapshots, &mut entry.bookmarks] {
            list.sort_by(|a, b| (a.createtxg, &a.name).cmp(&(b.createtxg, &b.name)));
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(s: &str) -> Dataset {
        Dataset::parse(s).expect("valid name")
    }

    // zfs-fuse 0.7.0: `zfs get -Hp -r -o name,property,value guid,createtxg rsa164384/r`
    const ZFS_FUSE: &str = "rsa164384/r\tguid\t15987997582382268604
rsa164384/r\tcreatetxg\t22
rsa164384/r@s2\tguid\t6101500246506444912
rsa164384/r@s2\tcreatetxg\t31
rsa164384/r@s3\tguid\t16351701576350508944
rsa164384/r@s3\tcreatetxg\t36
rsa164384/r/a\tguid\t13061951905723125638
rsa164384/r/a\tcreatetxg\t24
rsa164384/r/a/b\tguid\t15431083831869398810
rsa164384/r/a/b\tcreatetxg\t26
";

    #[test]
    fn a_zfs_fuse_listing_indexes_every_dataset_with_its_snapshots() {
        let tree = parse_tree(&ds("rsa164384/r"), ZFS_FUSE).expect("parses");
        let names: Vec<&str> = tree.keys().map(Dataset::as_str).collect();
        assert_eq!(names, ["rsa164384/r", "rsa164384/r/a", "rsa164384/r/a/b"]);
        let r = &tree[&ds("rsa164384/r")];
        assert_eq!(
            r.snapshots,
            [
                Snapshot {
                    name: "s2".into(),
                    guid: 6101500246506444912,
                    createtxg: 31
                },
                Snapshot {
                    name: "s3".into(),
                    guid: 16351701576350508944,
                    createtxg: 36
                }
            ]
        );
        assert!(tree[&ds("rsa164384/r/a")].snapshots.is_empty());
        assert_eq!(r.resume_token, None);
    }

    #[test]
    fn a_subtree_listing_skips_names_outside_the_root() {
        let tree = parse_tree(&ds("rsa164384/r/a"), ZFS_FUSE).expect("parses");
        let names: Vec<&str> = tree.keys().map(Dataset::as_str).collect();
        assert_eq!(names, ["rsa164384/r/a", "rsa164384/r/a/b"]);
    }

    #[test]
    fn bookmarks_and_resume_tokens_go_to_their_dataset() {
        let out = "p/a\treceive_resume_token\t1-abc-def
p/a@s\tguid\t7
p/a@s\tcreatetxg\t5
p/a@s\treceive_resume_token\t-
p/a#b\tguid\t7
p/a#b\tcreatetxg\t5
p/b\treceive_resume_token\t-
";
        let tree = parse_tree(&ds("p"), out).expect("parses");
        let a = &tree[&ds("p/a")];
        assert_eq!(a.resume_token.as_deref(), Some("1-abc-def"));
        assert_eq!(a.snapshots.len(), 1);
        assert_eq!(a.bookmarks[0].name, "b");
        assert_eq!(tree[&ds("p/b")].resume_token, None);
    }

    #[test]
    fn snapshots_are_sorted_by_createtxg_not_by_name() {
        let out = "p@b\tguid\t1\np@b\tcreatetxg\t9\np@a\tguid\t2\np@a\tcreatetxg\t10\n";
        let tree = parse_tree(&ds("p"), out).expect("parses");
        let names: Vec<&str> = tree[&ds("p")]
            .snapshots
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["b", "a"]);
    }

    #[test]
    fn a_broken_listing_is_refused_with_the_line() {
        for (out, want) in [
            ("p@a\tguid\n", "want name, property and value"),
            ("p@a\tguid\tx\np@a\tcreatetxg\t1\n", "not a number"),
            ("p@a\tguid\t1\n", "lacks its createtxg"),
            ("p@a\tguid\t1\np@a\tguid\t1\n", "listed twice"),
            ("p@a*b\tguid\t1\n", "not allowed"),
        ] {
            let err = parse_tree(&ds("p"), out).expect_err(out);
            assert!(format!("{err:#}").contains(want), "{out:?}: {err:#}");
        }
    }

    #[test]
    fn five_thousand_snapshots_parse_in_linear_time() {
        let mut out = String::from("p/d\tguid\t1\np/d\tcreatetxg\t1\n");
        for i in 0..5000u64 {
            out.push_str(&format!(
                "p/d@s{i}\tguid\t{}\np/d@s{i}\tcreatetxg\t{}\n",
                i + 10,
                i + 2
            ));
        }
        let start = std::time::Instant::now();
        let tree = parse_tree(&ds("p"), &out).expect("parses");
        assert_eq!(tree[&ds("p/d")].snapshots.len(), 5000);
        assert_eq!(tree[&ds("p/d")].snapshots[4999].name, "s4999");
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn the_argv_asks_for_types_and_tokens_only_where_the_zfs_has_them() {
        let fuse = Capabilities::default();
        assert_eq!(
            list_tree_argv(&ds("p/r"), &fuse).join(" "),
            "zfs get -Hp -r -o name,property,value guid,createtxg p/r"
        );
        let full = Capabilities {
            get_type_filter: true,
            bookmarks: true,
            resume_tokens: true,
            ..Capabilities::default()
        };
        assert_eq!(
            list_tree_argv(&ds("p/r"), &full).join(" "),
            "zfs get -Hp -r -t filesystem,volume,snapshot,bookmark -o name,property,value guid,createtxg,receive_resume_token p/r"
        );
    }
}
