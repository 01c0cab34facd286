//! Bulk data through the system's OpenSSH client. libssh2 encrypts one
//! 16-byte block per call and runs every channel of a host on one thread;
//! OpenSSH's `ssh` encrypts whole packets with OpenSSL (AES-NI) in its own
//! process, which on this 2-core bed costs a fraction of the CPU per byte.
//! So when `ssh` is installed (and `--ssh-data` does not say `libssh2`), the
//! `zfs send`/`zfs receive` of a stream in default mode run through it,
//! while every other command stays on the libssh2 session that [`SshHost`]
//! owns.
//!
//! The guarantees are kept by construction: `ssh` gets exactly the target
//! our own config parser resolved (`-F none`, HostName, Port, User, the
//! identity files, the known_hosts files and HostKeyAlias), with
//! `StrictHostKeyChecking=yes` (the libssh2 login before it already
//! checked, or with `--accept-new-host-key` recorded, the host key) and
//! `BatchMode=yes` (never a prompt). One master connection per host per run
//! (`ControlMaster`, started on first use, in a private directory) carries
//! every stream, so a run authenticates a fixed number of times; a master
//! that died with the link is replaced by the next stream's own connection.
//! A master that cannot start (a key only libssh2 can use, an `ssh` that
//! refuses an option) leaves the data on libssh2: [`OpenSsh::start`]
//! returns `None` and says why with `--debug`.
//!
//! [`SshHost`]: super::SshHost

use super::auth::Target;
use super::SshOptions;
use crate::host::local::LocalHost;
use crate::host::quote::sh_join;
use crate::host::{Child, CmdOutput, Host};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Which SSH carries the bulk data of default mode (`--ssh-data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPath {
    /// OpenSSH's `ssh` when it is installed and its master connects,
    /// libssh2 otherwise.
    #[default]
    Auto,
    /// Always libssh2 (the session everything else uses).
    Libssh2,
}

/// Ciphers for the bulk connection, cheapest first where the CPU has
/// AES-NI (OpenSSH's default puts ChaCha20-Poly1305 first).
const CIPHERS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr";

/// The system's `ssh`, with a master connection to one host.
pub struct OpenSsh {
    label: String,
    /// `ssh` followed by every option and the destination: append `--` and
    /// the remote command.
    base: Vec<String>,
    master: Mutex<Option<std::process::Child>>,
    /// Holds the control socket; removed with it.
    _dir: tempfile::TempDir,
}

impl OpenSsh {
    /// Starts the master connection to `target`. `Err` carries why it
    /// could not (the caller falls back to libssh2).
    pub(super) fn start(
        label: &str,
        target: &Target,
        opts: &SshOptions,
    ) -> Result<OpenSsh, String> {
        let program = which::which("ssh").map_err(|_| "ssh is not installed".to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("resync-ssh-")
            .tempdir()
            .map_err(|e| format!("cannot make a directory for the control socket: {e}"))?;
        let socket = dir.path().join("cm");
        let options = options(target, opts, &identity_files(target, opts), &socket);
        let mut master_argv = vec![program.display().to_string()];
        master_argv.extend(options.iter().cloned());
        master_argv.extend(
            ["-M", "-N", "-o", "ControlPersist=no"]
                .iter()
                .map(|s| s.to_string()),
        );
        master_argv.push(target.hostname.clone());
        let mut master = Command::new(&master_argv[0])
            .args(&master_argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start ssh: {e}"))?;
        let deadline = Instant::now() + opts.connect_timeout + Duration::from_secs(5);
        loop {
            if socket.exists() {
                break;
            }
            if let Ok(Some(status)) = master.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = master.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!(
                    "ssh's master connection exited ({status}): {}",
                    err.trim()
                ));
            }
            if Instant::now() > deadline {
                let _ = master.kill();
                let _ = master.wait();
                return Err("ssh's master connection did not come up in time".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The master's later complaints (a lost link) are not ours to show;
        // each stream's own ssh reports what matters to it.
        if let Some(mut e) = master.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut e, &mut std::io::sink()));
        }
        let mut base = vec![program.display().to_string()];
        base.extend(options);
        base.extend(["-o", "ControlMaster=no"].iter().map(|s| s.to_string()));
        base.push(target.hostname.clone());
        Ok(OpenSsh {
            label: label.to_string(),
            base,
            master: Mutex::new(Some(master)),
            _dir: dir,
        })
    }

    /// The local argv that runs `argv` on the host.
    fn wrap(&self, argv: &[String]) -> Vec<String> {
        let mut full = self.base.clone();
        full.push("--".into());
        full.push(sh_join(argv));
        full
    }
}

impl Drop for OpenSsh {
    fn drop(&mut self) {
        let master = self.master.get_mut().map(Option::take);
        if let Ok(Some(mut m)) = master {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

impl Host for OpenSsh {
    fn label(&self) -> &str {
        &self.label
    }

    fn run(&self, argv: &[String]) -> anyhow::Result<CmdOutput> {
        if argv.is_empty() {
            anyhow::bail!("empty command line for {}", self.label);
        }
        LocalHost::new().run_for(&self.label, &self.wrap(argv))
    }

    fn spawn(&self, argv: &[String]) -> anyhow::Result<Box<dyn Child>> {
        if argv.is_empty() {
            anyhow::bail!("empty command line for {}", self.label);
        }
        LocalHost::new().spawn_for(&self.label, &self.wrap(argv))
    }
}

/// The keys libssh2 would try, in its order: `--sshkey`, the config's
/// IdentityFile, then the default key files (ssh-agent comes through
/// `SSH_AUTH_SOCK` either way). OpenSSH would look for the defaults in the
/// passwd entry's home, not `$HOME`, so they are named here.
fn identity_files(target: &Target, opts: &SshOptions) -> Vec<PathBuf> {
    let defaults = ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|f| opts.home.join(".ssh").join(f));
    opts.key
        .iter()
        .cloned()
        .chain(target.identity_files.iter().cloned())
        .chain(defaults)
        .filter(|p| p.exists())
        .collect()
}

/// `ssh`'s options for `target`, without the destination. Pure.
fn options(target: &Target, opts: &SshOptions, keys: &[PathBuf], socket: &Path) -> Vec<String> {
    let files = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let alive = (opts.io_timeout / 4).max(Duration::from_secs(2)).as_secs();
    let mut o: Vec<String> = vec![
        "-F".into(),
        "none".into(),
        "-T".into(),
        "-x".into(),
        "-a".into(),
        "-p".into(),
        target.port.to_string(),
        "-l".into(),
        target.user.clone(),
    ];
    for key in keys {
        o.push("-i".into());
        o.push(key.display().to_string());
    }
    let mut set = |k: &str, v: String| {
        o.push("-o".into());
        o.push(format!("{k}={v}"));
    };
    set("BatchMode", "yes".into());
    set("StrictHostKeyChecking", "yes".into());
    set("UserKnownHostsFile", files(&target.user_known_hosts));
    set("GlobalKnownHostsFile", files(&target.global_known_hosts));
    if let Some(alias) = &target.host_key_alias {
        set("HostKeyAlias", alias.clone());
    }
    set(
        "Ciphers",
        opts.overrides.ciphers.as_deref().unwrap_or(CIPHERS).into(),
    );
    if opts.overrides.identities_only {
        set("IdentitiesOnly", "yes".into());
    }
    set("Compression", "no".into());
    set(
        "ConnectTimeout",
        opts.connect_timeout.as_secs().max(1).to_string(),
    );
    set("ServerAliveInterval", alive.to_string());
    set("ServerAliveCountMax", "4".into());
    set("ClearAllForwardings", "yes".into());
    set("LogLevel", "ERROR".into());
    set("ControlPath", socket.display().to_string());
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            alias: "backup".into(),
            hostname: "10.213.0.2".into(),
            port: 2222,
            user: "root".into(),
            identity_files: vec![],
            host_key_alias: Some("vault".into()),
            user_known_hosts: vec!["/h/.ssh/known_hosts".into(), "/h/my hosts".into()],
            global_known_hosts: vec!["/etc/ssh/ssh_known_hosts".into()],
        }
    }

    #[test]
    fn ssh_gets_exactly_the_target_we_resolved_and_checks_its_key() {
        let opts = SshOptions::with_home("/h".into());
        let o = options(
            &target(),
            &opts,
            &["/h/.ssh/id_ed25519".into()],
            Path::new("/tmp/x/cm"),
        );
        let joined = o.join(" ");
        assert!(o.starts_with(&["-F".into(), "none".into()]));
        for expected in [
            "-p 2222",
            "-l root",
            "-i /h/.ssh/id_ed25519",
            "-o BatchMode=yes",
            "-o StrictHostKeyChecking=yes",
            "-o UserKnownHostsFile=\"/h/.ssh/known_hosts\" \"/h/my hosts\"",
            "-o GlobalKnownHostsFile=\"/etc/ssh/ssh_known_hosts\"",
            "-o HostKeyAlias=vault",
            "-o ControlPath=/tmp/x/cm",
            "-o ServerAliveInterval=7",
            "-o Ciphers=aes128-gcm@openssh.com,",
        ] {
            assert!(joined.contains(expected), "{expected} missing in {joined}");
        }
        assert!(!joined.contains("IdentitiesOnly"));
        let mut opts = opts;
        opts.overrides.ciphers = Some("aes256-ctr".into());
        opts.overrides.identities_only = true;
        let joined = options(&target(), &opts, &[], Path::new("/s")).join(" ");
        assert!(joined.contains("-o Ciphers=aes256-ctr -o IdentitiesOnly=yes"));
    }
}
