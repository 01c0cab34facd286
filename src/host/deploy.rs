//! Our own binary on a remote host, for `--chunked` mode (which re-executes
//! it there as a chunk helper). [`deploy`] makes sure the host has this very
//! binary, by MD5, at `<tmpdir>/resync-bin-<uid>/resync-<md5>`, and uploads
//! it over an exec channel of the existing SSH session only when it is
//! missing or different; repeated runs reuse it.
//!
//! The private directory lives in a shared directory (`/tmp`) where another
//! user may have planted something first, so it is used only when it is a
//! real directory (not a symlink) owned by the SSH user and writable by
//! nobody else, and when every directory above it (symlinks in `tmpdir`
//! resolved) belongs to root or the SSH user and lets nobody else rename
//! entries (sticky, or not writable by group and others).
//! An upload goes to a temporary name in that directory, is checked with the
//! remote `md5sum`, made executable, renamed into place atomically and run
//! once (`--version`, which catches a `noexec` mount); anything that fails
//! removes what it wrote.
//!
//! Every remote command is an argv, `sh -c SCRIPT sh ARG...` with a constant
//! script and the values as positional parameters; the host layer quotes it.
//! The file is streamed, never held in memory as a whole. The remote needs a
//! POSIX `sh`, `uname`, `id`, `stat -c` (GNU or busybox), `mkdir`, `cat`,
//! `md5sum`, `chmod` and `mv`; `find` only to sweep leftovers. A deploy costs
//! two commands on the host when the binary is there, three when it is not.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::host::Host;
use crate::sys;

/// Where the binary ended up on the remote host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// Absolute path of the executable, `<tmpdir>/resync-bin-<uid>/resync-<md5>`.
    pub path: String,
    /// Lowercase hex MD5 of the binary.
    pub md5: String,
    /// False when an identical copy was already there.
    pub uploaded: bool,
}

/// Makes sure `host` has this very binary (by MD5) at a hash-named path in a
/// private per-user directory under `tmpdir` (an absolute path, normally
/// "/tmp"), uploading it only when it is missing or different. Refuses hosts
/// that are not x86_64 Linux, and a private directory that someone else could
/// control.
pub fn deploy(host: &dyn Host, tmpdir: &str) -> Result<Deployed> {
    let local = own_binary();
    let md5 = own_md5()?;
    deploy_file(host, tmpdir, &local, &md5)
}

/// Checks the output of `uname -sm`: "Linux x86_64" is the only system our
/// static binary runs on; anything else is a refusal naming what was found.
pub fn parse_uname(host: &str, out: &str) -> Result<()> {
    let found = out.split_whitespace().collect::<Vec<_>>().join(" ");
    match found.as_str() {
        "Linux x86_64" => Ok(()),
        "" => bail!("remote host {host} printed nothing for `uname -sm`; resync --chunked needs x86_64 Linux there"),
        _ => bail!("remote host {host} runs {found}; resync --chunked needs x86_64 Linux there"),
    }
}

/// The running executable: `/proc/self/exe` names the very file this process
/// runs even if its path was replaced since (a package upgrade), so the hash
/// and the upload always match what runs here.
fn own_binary() -> PathBuf {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return proc_exe.to_path_buf();
    }
    std::env::current_exe().unwrap_or_else(|_| proc_exe.to_path_buf())
}

/// MD5 of the running executable, computed once per process.
fn own_md5() -> Result<String> {
    static MD5: OnceLock<String> = OnceLock::new();
    if let Some(md5) = MD5.get() {
        return Ok(md5.clone());
    }
    let md5 = sys::md5_file(&own_binary())?;
    Ok(MD5.get_or_init(|| md5).clone())
}

/// Read and write size for uploading.
const BLOCK: usize = 256 << 10;

/// [`deploy`] for any local file and its MD5 (tests upload other binaries).
fn deploy_file(host: &dyn Host, tmpdir: &str, local: &Path, md5: &str) -> Result<Deployed> {
    let label = host.label();
    let tmpdir = normalize_tmpdir(tmpdir)?;
    // A bare argv first: it works under any login shell, so a foreign system
    // gets the clear refusal rather than a shell syntax error.
    let uname = host
        .run(&strings(&["uname", "-sm"]))?
        .check("uname -sm", label)?;
    parse_uname(label, &uname)?;

    let name = format!("resync-{md5}");
    let out = host
        .run(&sh(PREPARE, &[tmpdir, &name]))?
        .check("preparing resync's private directory", label)?;
    let probe = Probe::parse(&out)
        .with_context(|| format!("unexpected answer from {label} about {tmpdir}"))?;
    let path = format!("{}/{name}", probe.dir);
    match decide(&probe, md5, tmpdir)
        .with_context(|| format!("cannot put resync's binary on {label}"))?
    {
        Verdict::Reuse => Ok(Deployed {
            path,
            md5: md5.to_string(),
            uploaded: false,
        }),
        Verdict::Upload => {
            upload(host, local, &probe.dir, &name, md5)?;
            Ok(Deployed {
                path,
                md5: md5.to_string(),
                uploaded: true,
            })
        }
    }
}

/// `tmpdir` without trailing slashes; it must be absolute and one line.
fn normalize_tmpdir(tmpdir: &str) -> Result<&str> {
    if !tmpdir.starts_with('/') {
        bail!("the remote temporary directory must be an absolute path, not {tmpdir:?}");
    }
    if tmpdir.contains('\n') {
        bail!("the remote temporary directory {tmpdir:?} contains a newline");
    }
    let trimmed = tmpdir.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed })
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// `sh -c SCRIPT sh ARG...`: the values reach the script as `$1`, `$2`, ...
fn sh(script: &str, args: &[&str]) -> Vec<String> {
    let mut argv = strings(&["sh", "-c", script, "sh"]);
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

/// Creates the private directory when absent (`$1`: tmpdir, `$2`: binary
/// name) and reports, one `key value` line each, what is there: the tmpdir
/// with symlinks resolved, owner and mode of every directory from it up to
/// `/`, the private directory and the binary. Writes nothing else and
/// decides nothing. The MD5 of an existing binary is computed only inside a
/// directory the SSH user owns.
const PREPARE: &str = r#"umask 077
uid=$(id -u) || exit 1
echo "uid $uid"
if real=$(cd -P "$1" 2>/dev/null && pwd -P); then
	echo "tmpdir $real"
	p=$real
	while [ -n "$p" ]; do
		echo "ancestor $(stat -c '%u %A' "$p") $p"
		p=${p%/*}
	done
	echo "ancestor $(stat -c '%u %A' /) /"
	dir=${real%/}/resync-bin-$uid
	mkdir -m 700 "$dir" 2>/dev/null
else
	echo "tmpdir missing"
	dir=$1/resync-bin-$uid
fi
bin=$dir/$2
echo "dir $dir"
entry() {
	if [ -L "$2" ]; then echo "$1 symlink"
	elif [ "$3" "$2" ]; then echo "$1 present $(stat -c '%u %A' "$2")"
	elif [ -e "$2" ]; then echo "$1 other"
	else echo "$1 absent"; fi
}
entry dirstate "$dir" -d
entry bin "$bin" -f
if command -v md5sum >/dev/null 2>&1; then
	echo "md5sum yes"
	if [ -d "$dir" ] && [ "$(stat -c %u "$dir")" = "$uid" ] && [ -f "$bin" ] && ! [ -L "$bin" ]; then
		echo "md5 $(md5sum < "$bin")"
	fi
else
	echo "md5sum no"
fi
"#;

/// Receives the binary on stdin into a temporary name in the private
/// directory, checks its MD5, installs it and runs it once (`$1`: directory,
/// `$2`: binary name, `$3`: temporary name, `$4`: expected MD5). Leftovers of
/// interrupted uploads older than an hour are removed on the way.
const UPLOAD: &str = r#"umask 077
part=$1/$3
final=$1/$2
fail() { rm -f "$part"; echo "$*" >&2; exit 1; }
trap 'rm -f "$part"; exit 1' HUP INT TERM PIPE
find "$1" -maxdepth 1 -name '.resync-*.part' -mmin +60 -exec rm -f {} + 2>/dev/null
set -C
cat > "$part" || fail "cannot write $part"
set +C
sum=$(md5sum < "$part") || fail "md5sum failed on $part"
sum=${sum%% *}
[ "$sum" = "$4" ] || fail "the uploaded copy has MD5 $sum, expected $4 (removed it)"
chmod 700 "$part" || fail "cannot chmod $part"
if [ -L "$final" ]; then rm -f "$final"; fi
[ -d "$final" ] && fail "$final is a directory; remove it"
mv -f "$part" "$final" || fail "cannot rename $part to $final"
out=$("$final" --version 2>&1) || {
	rm -f "$final"
	echo "cannot run $final (is $1 on a noexec mount?): $out" >&2
	exit 1
}
"#;

/// What [`PREPARE`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Probe {
    uid: u32,
    /// The private directory.
    dir: String,
    /// The directory it lives in, symlinks resolved; `None` when it does not
    /// exist.
    tmpdir: Option<String>,
    /// That directory and each one above it, with owner and mode.
    ancestors: Vec<(String, Owned)>,
    dir_state: Entry,
    bin: Entry,
    have_md5sum: bool,
    /// MD5 of the existing binary, when it was safe to compute.
    md5: Option<String>,
}

/// A directory entry: missing, a symlink, something of the wrong kind, or of
/// the expected kind (directory or regular file) with owner and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Absent,
    Symlink,
    Other,
    Present(Owned),
}

/// Owner uid and `ls -l` style mode (`drwx------`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owned {
    uid: u32,
    mode: String,
}

impl Owned {
    fn parse(text: &str) -> Result<Owned> {
        let (uid, mode) = text
            .split_once(' ')
            .ok_or_else(|| anyhow!("expected 'UID MODE', got {text:?}"))?;
        if mode.len() != 10 || !mode.is_ascii() {
            bail!("unexpected mode {mode:?}");
        }
        Ok(Owned {
            uid: parse_uid(uid)?,
            mode: mode.to_string(),
        })
    }

    /// Group or others may create, rename and delete entries in it.
    fn writable_by_others(&self) -> bool {
        let m = self.mode.as_bytes();
        m[5] == b'w' || m[8] == b'w'
    }

    /// Sticky: only an entry's owner may rename or delete it.
    fn sticky(&self) -> bool {
        matches!(self.mode.as_bytes()[9], b't' | b'T')
    }
}

fn parse_uid(text: &str) -> Result<u32> {
    text.parse()
        .map_err(|_| anyhow!("expected a numeric uid, got {text:?}"))
}

impl Probe {
    fn parse(out: &str) -> Result<Probe> {
        let mut uid = None;
        let mut dir = None;
        let mut tmpdir = None;
        let mut ancestors = Vec::new();
        let mut dir_state = None;
        let mut bin = None;
        let mut have_md5sum = None;
        let mut md5 = None;
        for line in out.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "uid" => uid = Some(parse_uid(value)?),
                "dir" => dir = Some(value.to_string()),
                "tmpdir" if value == "missing" => tmpdir = Some(None),
                "tmpdir" => tmpdir = Some(Some(value.to_string())),
                "ancestor" => {
                    let mut words = value.splitn(3, ' ');
                    let (Some(uid), Some(mode), Some(path)) =
                        (words.next(), words.next(), words.next())
                    else {
                        bail!("unexpected line {line:?}");
                    };
                    ancestors.push((path.to_string(), Owned::parse(&format!("{uid} {mode}"))?));
                }
                "dirstate" => dir_state = Some(parse_entry(value)?),
                "bin" => bin = Some(parse_entry(value)?),
                "md5sum" => have_md5sum = Some(value == "yes"),
                "md5" => md5 = value.split_whitespace().next().map(str::to_string),
                _ => bail!("unexpected line {line:?}"),
            }
        }
        let missing = |what: &str| anyhow!("no {what} line in {out:?}");
        let tmpdir = tmpdir.ok_or_else(|| missing("tmpdir"))?;
        if tmpdir.is_some() && ancestors.is_empty() {
            return Err(missing("ancestor"));
        }
        Ok(Probe {
            uid: uid.ok_or_else(|| missing("uid"))?,
            dir: dir.ok_or_else(|| missing("dir"))?,
            tmpdir,
            ancestors,
            dir_state: dir_state.ok_or_else(|| missing("dirstate"))?,
            bin: bin.ok_or_else(|| missing("bin"))?,
            have_md5sum: have_md5sum.ok_or_else(|| missing("md5sum"))?,
            md5,
        })
    }
}

fn parse_entry(value: &str) -> Result<Entry> {
    Ok(match value {
        "absent" => Entry::Absent,
        "symlink" => Entry::Symlink,
        "other" => Entry::Other,
        _ => match value.strip_prefix("present ") {
            Some(rest) => Entry::Present(Owned::parse(rest)?),
            None => bail!("unexpected entry state {value:?}"),
        },
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// An identical, private, executable copy is in place.
    Reuse,
    /// The directory is safe to write to; the binary must be uploaded.
    Upload,
}

/// Pure: whether the private directory may be used, and whether the binary
/// there can be reused. Errors say what is wrong and with which path.
fn decide(p: &Probe, md5: &str, tmpdir: &str) -> Result<Verdict> {
    let uid = p.uid;
    if p.tmpdir.is_none() {
        bail!("{tmpdir} does not exist");
    }
    // Whoever may rename an entry on the way could swap the binary's
    // directory for their own.
    for (path, owner) in &p.ancestors {
        if owner.uid != 0 && owner.uid != uid {
            bail!(
                "{path} belongs to uid {}: refusing to keep resync's binary under it \
                 (every directory on the way must belong to root or uid {uid})",
                owner.uid
            );
        }
        if owner.writable_by_others() && !owner.sticky() {
            bail!(
                "{path} is writable by other users and not sticky ({}): \
                 refusing to keep resync's binary under it",
                owner.mode
            );
        }
    }
    let dir = &p.dir;
    match &p.dir_state {
        Entry::Present(d) if d.uid != uid => bail!(
            "{dir} belongs to uid {}, not to uid {uid} (the SSH user): refusing to use it; \
             remove it if nobody should have made it",
            d.uid
        ),
        Entry::Present(d) if d.writable_by_others() => bail!(
            "{dir} is writable by other users ({}): refusing to use it; remove it",
            d.mode
        ),
        Entry::Present(_) => {}
        Entry::Symlink => {
            bail!("{dir} is a symlink, not resync's private directory: refusing to follow it; remove it")
        }
        Entry::Other => bail!("{dir} exists and is not a directory: refusing to use it; remove it"),
        Entry::Absent => bail!("cannot create {dir}"),
    }
    if !p.have_md5sum {
        bail!("md5sum is not installed: resync needs it to verify its binary there");
    }
    let reusable = match &p.bin {
        Entry::Present(f) => {
            f.uid == uid && f.mode == "-rwx------" && p.md5.as_deref() == Some(md5)
        }
        _ => false,
    };
    Ok(if reusable {
        Verdict::Reuse
    } else {
        Verdict::Upload
    })
}

/// Streams `local` into [`UPLOAD`]. The remote verdict (MD5 mismatch, full
/// disk, noexec) is the error when there is one; a local read error kills
/// the upload (whose partial file the remote then removes).
fn upload(host: &dyn Host, local: &Path, dir: &str, name: &str, md5: &str) -> Result<()> {
    let label = host.label();
    let mut file = File::open(local)
        .with_context(|| format!("cannot open {} to upload it", local.display()))?;
    let part = format!(".{name}.{}.part", unique_suffix());
    let what = format!("installing {dir}/{name}");
    let mut child = host
        .spawn(&sh(UPLOAD, &[dir, name, &part, md5]))
        .with_context(|| format!("{what} on {label}"))?;
    let Some(mut stdin) = child.take_stdin() else {
        child.kill();
        let _ = child.wait();
        bail!("{what} on {label}: no stdin to write to");
    };
    let mut buf = vec![0u8; BLOCK];
    let mut write_error = None;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                drop(stdin);
                child.kill();
                let _ = child.wait();
                return Err(e).with_context(|| format!("cannot read {}", local.display()));
            }
        };
        if let Err(e) = stdin.write_all(&buf[..n]) {
            write_error = Some(e);
            break;
        }
    }
    if write_error.is_none() {
        write_error = stdin.flush().err();
    }
    drop(stdin);
    let exit = child.wait().with_context(|| format!("{what} on {label}"))?;
    exit.check(&what, label)?;
    match write_error {
        Some(e) => Err(e).with_context(|| format!("{what} on {label}: sending the file")),
        None => Ok(()),
    }
}

/// Distinguishes concurrent uploads (from several runs) of the same binary.
fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uname_of_x86_64_linux_is_accepted() {
        parse_uname("root@nas", "Linux x86_64\n").unwrap();
        parse_uname("root@nas", "  Linux   x86_64 ").unwrap();
    }

    #[test]
    fn uname_of_anything_else_is_refused_naming_it() {
        let err = |out: &str| parse_uname("root@nas", out).unwrap_err().to_string();
        assert_eq!(
            err("FreeBSD amd64\n"),
            "remote host root@nas runs FreeBSD amd64; resync --chunked needs x86_64 Linux there"
        );
        assert_eq!(
            err("Linux aarch64\n"),
            "remote host root@nas runs Linux aarch64; resync --chunked needs x86_64 Linux there"
        );
        assert_eq!(
            err("Darwin arm64"),
            "remote host root@nas runs Darwin arm64; resync --chunked needs x86_64 Linux there"
        );
        assert!(err("Linux i686").contains("runs Linux i686"));
        assert!(err("Linux x86_64 extra").contains("runs Linux x86_64 extra"));
        assert_eq!(
            err("\n"),
            "remote host root@nas printed nothing for `uname -sm`; resync --chunked needs x86_64 Linux there"
        );
    }

    #[test]
    fn tmpdir_must_be_absolute_and_loses_trailing_slashes() {
        assert_eq!(normalize_tmpdir("/tmp").unwrap(), "/tmp");
        assert_eq!(normalize_tmpdir("/var/tmp//").unwrap(), "/var/tmp");
        assert_eq!(normalize_tmpdir("/").unwrap(), "/");
        assert!(normalize_tmpdir("tmp").is_err());
        assert!(normalize_tmpdir("").is_err());
        assert!(normalize_tmpdir("/tmp/a\nb").is_err());
    }

    const MD5: &str = "0123456789abcdef0123456789abcdef";

    /// Real output of PREPARE on the test bed after a first deploy
    /// (`sh -c PREPARE sh /tmp resync-<md5>` as root).
    const PREPARED: &str = "uid 0\n\
        tmpdir /tmp\n\
        ancestor 0 drwxrwxrwt /tmp\n\
        ancestor 0 drwxr-xr-x /\n\
        dir /tmp/resync-bin-0\n\
        dirstate present 0 drwx------\n\
        bin present 0 -rwx------\n\
        md5sum yes\n\
        md5 0123456789abcdef0123456789abcdef  -\n";

    fn probe() -> Probe {
        Probe::parse(PREPARED).unwrap()
    }

    fn owned(uid: u32, mode: &str) -> Owned {
        Owned {
            uid,
            mode: mode.into(),
        }
    }

    #[test]
    fn prepare_output_parses() {
        assert_eq!(
            probe(),
            Probe {
                uid: 0,
                dir: "/tmp/resync-bin-0".into(),
                tmpdir: Some("/tmp".into()),
                ancestors: vec![
                    ("/tmp".into(), owned(0, "drwxrwxrwt")),
                    ("/".into(), owned(0, "drwxr-xr-x")),
                ],
                dir_state: Entry::Present(owned(0, "drwx------")),
                bin: Entry::Present(owned(0, "-rwx------")),
                have_md5sum: true,
                md5: Some(MD5.into()),
            }
        );
        let fresh = "uid 1000\ntmpdir missing\ndir /var/tmp/resync-bin-1000\n\
                     dirstate absent\nbin absent\nmd5sum no\n";
        let p = Probe::parse(fresh).unwrap();
        assert_eq!(
            (p.uid, p.tmpdir, p.dir_state, p.bin, p.have_md5sum, p.md5),
            (1000, None, Entry::Absent, Entry::Absent, false, None)
        );
        let spaced = PREPARED.replace("/tmp", "/srv/my tmp");
        let p = Probe::parse(&spaced).unwrap();
        assert_eq!(p.ancestors[0].0, "/srv/my tmp");
        assert_eq!(p.dir, "/srv/my tmp/resync-bin-0");
    }

    #[test]
    fn garbled_prepare_output_is_an_error() {
        assert!(Probe::parse("").is_err());
        assert!(Probe::parse("sh: 1: stat: not found\n").is_err());
        assert!(Probe::parse(&PREPARED.replace("uid 0", "uid root")).is_err());
        assert!(Probe::parse(&PREPARED.replace("drwx------", "drwx")).is_err());
        assert!(Probe::parse(&PREPARED.replace("bin present", "bin weird")).is_err());
        assert!(Probe::parse(&PREPARED.replace("md5sum yes\n", "")).is_err());
        assert!(Probe::parse(&PREPARED.replace("ancestor 0 drwxr-xr-x /", "ancestor  /")).is_err());
        let no_ancestors: String = PREPARED
            .lines()
            .filter(|l| !l.starts_with("ancestor"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(Probe::parse(&no_ancestors).is_err());
    }

    fn verdict(p: &Probe) -> Result<Verdict> {
        decide(p, MD5, "/tmp")
    }

    fn refusal(p: &Probe) -> String {
        verdict(p).unwrap_err().to_string()
    }

    #[test]
    fn identical_private_executable_copy_is_reused() {
        assert_eq!(verdict(&probe()).unwrap(), Verdict::Reuse);
        let mut p = probe();
        p.dir_state = Entry::Present(owned(0, "drwxr-xr-x"));
        assert_eq!(verdict(&p).unwrap(), Verdict::Reuse);
    }

    #[test]
    fn missing_different_or_loose_copies_are_uploaded() {
        let cases: Vec<fn(&mut Probe)> = vec![
            |p| (p.bin, p.md5) = (Entry::Absent, None),
            |p| p.md5 = Some("ffffffffffffffffffffffffffffffff".into()),
            |p| p.bin = Entry::Present(owned(0, "-rw-------")),
            |p| p.bin = Entry::Present(owned(0, "-rwxr-xr-x")),
            |p| p.bin = Entry::Present(owned(1000, "-rwx------")),
            |p| (p.bin, p.md5) = (Entry::Symlink, None),
            |p| (p.bin, p.md5) = (Entry::Other, None),
        ];
        for (i, change) in cases.iter().enumerate() {
            let mut p = probe();
            change(&mut p);
            assert_eq!(verdict(&p).unwrap(), Verdict::Upload, "case {i}: {p:?}");
        }
    }

    #[test]
    fn private_dir_that_others_control_is_refused() {
        let mut p = probe();
        p.dir_state = Entry::Symlink;
        assert_eq!(
            refusal(&p),
            "/tmp/resync-bin-0 is a symlink, not resync's private directory: \
             refusing to follow it; remove it"
        );
        p.dir_state = Entry::Other;
        assert_eq!(
            refusal(&p),
            "/tmp/resync-bin-0 exists and is not a directory: refusing to use it; remove it"
        );
        p.dir_state = Entry::Present(owned(1001, "drwx------"));
        assert_eq!(
            refusal(&p),
            "/tmp/resync-bin-0 belongs to uid 1001, not to uid 0 (the SSH user): \
             refusing to use it; remove it if nobody should have made it"
        );
        p.dir_state = Entry::Present(owned(0, "drwxrwxrwx"));
        assert!(refusal(&p).contains("writable by other users (drwxrwxrwx)"));
        p.dir_state = Entry::Present(owned(0, "drwx-w----"));
        assert!(refusal(&p).contains("writable by other users"));
        p.dir_state = Entry::Absent;
        assert_eq!(refusal(&p), "cannot create /tmp/resync-bin-0");
    }

    #[test]
    fn directories_on_the_way_that_others_could_rename_in_are_refused() {
        let mut p = probe();
        p.ancestors[0].1 = owned(0, "drwxrwxrwx");
        assert_eq!(
            refusal(&p),
            "/tmp is writable by other users and not sticky (drwxrwxrwx): \
             refusing to keep resync's binary under it"
        );
        p.ancestors[0].1 = owned(0, "drwxrwx---");
        assert!(refusal(&p).contains("not sticky"));
        p.ancestors[0].1 = owned(1001, "drwxr-xr-x");
        assert_eq!(
            refusal(&p),
            "/tmp belongs to uid 1001: refusing to keep resync's binary under it \
             (every directory on the way must belong to root or uid 0)"
        );
        p.ancestors[0].1 = owned(0, "drwxrwxrwt");
        p.ancestors[1].1 = owned(1001, "drwxr-xr-x");
        assert!(refusal(&p).starts_with("/ belongs to uid 1001"));
        p.tmpdir = None;
        p.ancestors.clear();
        assert_eq!(refusal(&p), "/tmp does not exist");
    }

    #[test]
    fn own_directory_or_a_sticky_one_is_fine() {
        let mut p = probe();
        p.uid = 1001;
        p.ancestors = vec![
            ("/home/u/tmp".into(), owned(1001, "drwx------")),
            ("/home/u".into(), owned(1001, "drwxr-x---")),
            ("/home".into(), owned(0, "drwxr-xr-x")),
            ("/".into(), owned(0, "drwxr-xr-x")),
        ];
        p.dir_state = Entry::Present(owned(1001, "drwx------"));
        assert_eq!(verdict(&p).unwrap(), Verdict::Upload);
        p.ancestors[0].1 = owned(0, "drwxrwxrwT");
        assert_eq!(verdict(&p).unwrap(), Verdict::Upload);
    }

    #[test]
    fn missing_md5sum_is_a_clear_error() {
        let mut p = probe();
        p.have_md5sum = false;
        assert_eq!(
            refusal(&p),
            "md5sum is not installed: resync needs it to verify its binary there"
        );
    }

    #[test]
    fn own_md5_matches_md5sum_and_is_computed_once() {
        let first = own_md5().unwrap();
        let ours = std::process::Command::new("md5sum")
            .arg(std::env::current_exe().unwrap())
            .output()
            .unwrap();
        let ours = String::from_utf8(ours.stdout).unwrap();
        assert_eq!(ours.split_whitespace().next().unwrap(), first);
        assert_eq!(own_md5().unwrap(), first);
    }

    // ---- The whole flow on this machine (LocalHost, a temporary tmpdir) ----

    use crate::host::LocalHost;
    use std::os::unix::fs::PermissionsExt;

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// A stand-in binary that answers `--version` (GNU true does), with its MD5.
    fn stand_in(dir: &Path) -> (PathBuf, String) {
        let bin = dir.join("stand-in");
        std::fs::copy("/bin/true", &bin).unwrap();
        let md5 = sys::md5_file(&bin).unwrap();
        (bin, md5)
    }

    fn tmpdir_str(dir: &tempfile::TempDir) -> String {
        dir.path().display().to_string()
    }

    fn private_dir(tmp: &tempfile::TempDir) -> PathBuf {
        tmp.path().join(format!("resync-bin-{}", euid()))
    }

    #[test]
    fn local_deploy_uploads_then_reuses_then_replaces_a_corrupted_copy() {
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        let host = LocalHost::new();

        let first = deploy_file(&host, &tmpdir_str(&tmp), &bin, &md5).unwrap();
        let expected = private_dir(&tmp).join(format!("resync-{md5}"));
        assert_eq!(
            first,
            Deployed {
                path: expected.display().to_string(),
                md5: md5.clone(),
                uploaded: true
            }
        );
        let dir_meta = std::fs::symlink_metadata(private_dir(&tmp)).unwrap();
        assert!(dir_meta.is_dir());
        assert_eq!(dir_meta.permissions().mode() & 0o7777, 0o700);
        let meta = std::fs::symlink_metadata(&expected).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        assert_eq!(sys::md5_file(&expected).unwrap(), md5);

        let second = deploy_file(&host, &tmpdir_str(&tmp), &bin, &md5).unwrap();
        assert!(!second.uploaded);
        assert_eq!(second.path, first.path);

        let mut bytes = std::fs::read(&expected).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&expected, &bytes).unwrap();
        let third = deploy_file(&host, &tmpdir_str(&tmp), &bin, &md5).unwrap();
        assert!(third.uploaded);
        assert_eq!(sys::md5_file(&expected).unwrap(), md5);
        // Nothing but the binary is left in the private directory.
        let names: Vec<_> = std::fs::read_dir(private_dir(&tmp))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(format!("resync-{md5}"))]
        );
    }

    #[test]
    fn shell_syntax_in_the_tmpdir_reaches_the_scripts_as_data() {
        // Every value goes to PREPARE and UPLOAD as a positional parameter:
        // a tmpdir full of shell syntax is a directory name, nothing runs.
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("pwned");
        // A directory name cannot hold a '/': the marker's path comes from
        // the environment, which the scripts inherit.
        std::env::set_var("RESYNC_DEPLOY_TEST_MARKER", &marker);
        let hostile = tmp.path().join(
            "a b $(touch \"$RESYNC_DEPLOY_TEST_MARKER\") \
             `touch \"$RESYNC_DEPLOY_TEST_MARKER\"`; touch \"$RESYNC_DEPLOY_TEST_MARKER\" '\" *",
        );
        std::fs::create_dir(&hostile).unwrap();
        let tmpdir = hostile.to_str().unwrap();
        let first = deploy_file(&LocalHost::new(), tmpdir, &bin, &md5).unwrap();
        let expected = hostile.join(format!("resync-bin-{}/resync-{md5}", euid()));
        assert_eq!(first.path, expected.to_str().unwrap());
        assert!(first.uploaded);
        assert_eq!(sys::md5_file(&expected).unwrap(), md5);
        assert!(!marker.exists(), "a value was run as shell code");
        let again = deploy_file(&LocalHost::new(), tmpdir, &bin, &md5).unwrap();
        assert!(!again.uploaded, "the MD5 of the copy was read back");
        assert!(!marker.exists());
    }

    #[test]
    fn local_symlink_at_private_dir_path_is_refused_and_not_written_through() {
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, private_dir(&tmp)).unwrap();
        let err = deploy_file(&LocalHost::new(), &tmpdir_str(&tmp), &bin, &md5).unwrap_err();
        assert!(format!("{err:#}").contains("is a symlink"), "{err:#}");
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
    }

    #[test]
    fn local_tmpdir_given_through_a_symlink_is_resolved() {
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let d = deploy_file(&LocalHost::new(), link.to_str().unwrap(), &bin, &md5).unwrap();
        let expected = real.join(format!("resync-bin-{}/resync-{md5}", euid()));
        assert_eq!(d.path, expected.display().to_string());
        assert!(expected.is_file());
    }

    #[test]
    fn local_tmpdir_inside_a_foreign_directory_is_refused() {
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir_all(theirs.join("tmp")).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534))
            .expect("the unit tests run as root, which may chown");
        let tmpdir = theirs.join("tmp");
        let err = deploy_file(&LocalHost::new(), tmpdir.to_str().unwrap(), &bin, &md5).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("{} belongs to uid 65534", theirs.display())),
            "{err:#}"
        );
    }

    #[test]
    fn local_file_at_private_dir_path_is_refused() {
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(private_dir(&tmp), "x").unwrap();
        let err = deploy_file(&LocalHost::new(), &tmpdir_str(&tmp), &bin, &md5).unwrap_err();
        assert!(format!("{err:#}").contains("is not a directory"), "{err:#}");
        assert_eq!(std::fs::read(private_dir(&tmp)).unwrap(), b"x");
    }

    #[test]
    fn local_foreign_owned_private_dir_is_refused() {
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        let dir = private_dir(&tmp);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534))
            .expect("the unit tests run as root, which may chown");
        let err = deploy_file(&LocalHost::new(), &tmpdir_str(&tmp), &bin, &md5).unwrap_err();
        assert!(
            format!("{err:#}").contains("belongs to uid 65534"),
            "{err:#}"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn local_symlink_at_binary_path_is_replaced_not_followed() {
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        let dir = private_dir(&tmp);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.join(format!("resync-{md5}"));
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let d = deploy_file(&LocalHost::new(), &tmpdir_str(&tmp), &bin, &md5).unwrap();
        assert!(d.uploaded);
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn local_upload_with_wrong_md5_is_removed_and_reported() {
        let src = tempfile::tempdir().unwrap();
        let (bin, md5) = stand_in(src.path());
        let tmp = tempfile::tempdir().unwrap();
        let wrong = "ffffffffffffffffffffffffffffffff";
        let err = deploy_file(&LocalHost::new(), &tmpdir_str(&tmp), &bin, wrong).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!(
                "the uploaded copy has MD5 {md5}, expected {wrong}"
            )),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(private_dir(&tmp)).unwrap().count(), 0);
    }

    #[test]
    fn local_binary_that_cannot_run_is_removed_and_reported() {
        let src = tempfile::tempdir().unwrap();
        let bin = src.path().join("broken");
        let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
        bytes.resize(4096, 0);
        std::fs::write(&bin, &bytes).unwrap();
        let md5 = sys::md5_file(&bin).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let err = deploy_file(&LocalHost::new(), &tmpdir_str(&tmp), &bin, &md5).unwrap_err();
        assert!(format!("{err:#}").contains("noexec mount?"), "{err:#}");
        assert_eq!(std::fs::read_dir(private_dir(&tmp)).unwrap().count(), 0);
    }

    // ---- Live, on the shared test bed's host A over SSH ----
    // `#[ignore]`d like the SSH transport's live tests (scripts/test.sh runs
    // them with RESYNC_TESTBED set); by hand:
    // `RESYNC_TESTBED=/var/tmp/resync-dev/env cargo test --bin resync deploy::tests::live -- --ignored`

    use crate::host::{SshHost, SshOptions, SshSpec};
    use std::time::Instant;

    /// Host A of the bed named by `$RESYNC_TESTBED`: reached with our SSH
    /// layer for deploying and with OpenSSH (the bed's wrapper) for checking.
    struct BedHost {
        addr: String,
        home: PathBuf,
        tbssh: PathBuf,
    }

    impl BedHost {
        fn get() -> BedHost {
            let path = std::env::var("RESYNC_TESTBED")
                .expect("test bed not up: set RESYNC_TESTBED (e.g. /var/tmp/resync-dev/env)");
            let text = std::fs::read_to_string(&path).unwrap();
            let var = |key: &str| -> String {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{key}=")))
                    .map(|v| v.trim_matches(|c| c == '"' || c == '\'').to_string())
                    .unwrap_or_else(|| panic!("{path} lacks {key}"))
            };
            BedHost {
                addr: var("TB_HOST_A"),
                home: var("TB_HOME").into(),
                tbssh: var("TB_SSH").into(),
            }
        }

        fn connect(&self) -> SshHost {
            std::env::remove_var("SSH_AUTH_SOCK");
            let spec = SshSpec::parse(&format!("root@{}", self.addr));
            SshHost::connect(&spec, &SshOptions::with_home(self.home.clone())).unwrap()
        }

        /// Runs a shell command on the host with OpenSSH; its stdout.
        #[track_caller]
        fn sh(&self, cmd: &str) -> String {
            let out = std::process::Command::new(&self.tbssh)
                .arg(format!("root@{}", self.addr))
                .arg(cmd)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    }

    /// A fresh directory on the host, removed with everything in it on drop.
    struct RemoteDir<'a> {
        bed: &'a BedHost,
        path: String,
    }

    impl<'a> RemoteDir<'a> {
        fn new(bed: &'a BedHost, parent: &str) -> RemoteDir<'a> {
            let path = format!("{parent}/resync-deploy-test-{}", unique_suffix());
            bed.sh(&format!("mkdir -m 755 {path}"));
            RemoteDir { bed, path }
        }

        fn private_dir(&self) -> String {
            format!("{}/resync-bin-0", self.path)
        }
    }

    impl Drop for RemoteDir<'_> {
        fn drop(&mut self) {
            self.bed.sh(&format!("rm -rf {}", self.path));
        }
    }

    /// The resync binary cargo built next to this test binary: release when
    /// there is one (smaller, what users deploy), else debug.
    fn resync_binary(prefer_release: bool) -> (PathBuf, String, u64) {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let debug = profile_dir.join("resync");
        let release = profile_dir.parent().unwrap().join("release/resync");
        let bin = if prefer_release && release.exists() {
            release
        } else {
            debug
        };
        assert!(bin.exists(), "{} not built: run cargo build", bin.display());
        let md5 = sys::md5_file(&bin).unwrap();
        let size = std::fs::metadata(&bin).unwrap().len();
        (bin, md5, size)
    }

    fn rate(size: u64, took: std::time::Duration) -> String {
        format!(
            "{:.1} MB in {took:.2?} = {:.0} MB/s",
            size as f64 / 1e6,
            size as f64 / 1e6 / took.as_secs_f64()
        )
    }

    #[test]
    #[ignore]
    fn live_deploy_uploads_reuses_and_repairs_on_a_bed_host() {
        let bed = BedHost::get();
        let tmp = RemoteDir::new(&bed, "/tmp");
        let host = bed.connect();
        let (bin, md5, size) = resync_binary(true);

        let started = Instant::now();
        let first = deploy_file(&host, &tmp.path, &bin, &md5).unwrap();
        eprintln!(
            "first deploy of {}: {}",
            bin.display(),
            rate(size, started.elapsed())
        );
        let path = format!("{}/resync-{md5}", tmp.private_dir());
        assert_eq!((first.path.as_str(), first.uploaded), (path.as_str(), true));
        let facts = bed.sh(&format!(
            "stat -c '%u %a %F' {dir} {path}; md5sum < {path}; {path} --version",
            dir = tmp.private_dir()
        ));
        assert_eq!(
            facts,
            format!(
                "0 700 directory\n0 700 regular file\n{md5}  -\nresync {}\n",
                env!("CARGO_PKG_VERSION")
            )
        );

        let started = Instant::now();
        let second = deploy_file(&host, &tmp.path, &bin, &md5).unwrap();
        eprintln!("reuse check: {:.2?}", started.elapsed());
        assert_eq!(
            (second.path.as_str(), second.uploaded),
            (path.as_str(), false)
        );

        bed.sh(&format!(
            "printf Z | dd of={path} bs=1 seek=4096 conv=notrunc 2>/dev/null"
        ));
        assert_ne!(bed.sh(&format!("md5sum < {path}")), format!("{md5}  -\n"));
        let third = deploy_file(&host, &tmp.path, &bin, &md5).unwrap();
        assert_eq!((third.path.as_str(), third.uploaded), (path.as_str(), true));
        assert_eq!(
            bed.sh(&format!("md5sum < {path}; ls -A {}", tmp.private_dir())),
            format!("{md5}  -\nresync-{md5}\n")
        );
    }

    #[test]
    #[ignore]
    fn live_hostile_private_dir_is_refused_on_a_bed_host() {
        let bed = BedHost::get();
        let tmp = RemoteDir::new(&bed, "/tmp");
        let host = bed.connect();
        let (bin, md5, _) = resync_binary(true);
        let dir = tmp.private_dir();
        let refusal = || {
            format!(
                "{:#}",
                deploy_file(&host, &tmp.path, &bin, &md5).unwrap_err()
            )
        };

        bed.sh(&format!(
            "mkdir {t}/victim && ln -s {t}/victim {dir}",
            t = tmp.path
        ));
        let err = refusal();
        assert!(err.contains(&format!("{dir} is a symlink")), "{err}");
        assert_eq!(bed.sh(&format!("ls -A {}/victim", tmp.path)), "");

        bed.sh(&format!(
            "rm {dir} && mkdir -m 777 {dir} && chown 65534:65534 {dir}"
        ));
        let err = refusal();
        assert!(
            err.contains(&format!("{dir} belongs to uid 65534")),
            "{err}"
        );
        assert_eq!(bed.sh(&format!("ls -A {dir}")), "");

        bed.sh(&format!("chown 0:0 {dir}"));
        let err = refusal();
        assert!(
            err.contains("writable by other users (drwxrwxrwx)"),
            "{err}"
        );
        assert_eq!(bed.sh(&format!("ls -A {dir}")), "");

        bed.sh(&format!("chmod 1777 {}", tmp.path));
        bed.sh(&format!("rmdir {dir} && chown 65534 {}", tmp.path));
        let err = refusal();
        assert!(err.contains("belongs to uid 65534: refusing"), "{err}");
    }

    /// Upload throughput of the (larger) debug binary, into /var/tmp on the
    /// host (its /tmp is a small tmpfs that other tests share).
    #[test]
    #[ignore]
    fn live_upload_speed_of_the_debug_binary() {
        let bed = BedHost::get();
        let tmp = RemoteDir::new(&bed, "/var/tmp");
        let host = bed.connect();
        let (bin, md5, size) = resync_binary(false);
        let mut times = Vec::new();
        for _ in 0..3 {
            bed.sh(&format!("rm -rf {}", tmp.private_dir()));
            let started = Instant::now();
            assert!(deploy_file(&host, &tmp.path, &bin, &md5).unwrap().uploaded);
            times.push(started.elapsed());
        }
        times.sort();
        eprintln!("debug binary upload, median of 3: {}", rate(size, times[1]));
    }
}
