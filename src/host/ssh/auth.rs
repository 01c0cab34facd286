//! Who connects where, and whether to trust the other end: the target after
//! `~/.ssh/config` (HostName, User, Port, IdentityFile, the known_hosts files
//! and HostKeyAlias) and the command line are merged, the host key check
//! against known_hosts (unknown: refuse, or append with
//! `--accept-new-host-key`; changed or revoked: always refuse), and login
//! (ssh-agent, then `--sshkey`, the config's keys and the default key files).
//! The parsing itself is `sshconfig.rs`'s and `knownhosts.rs`'s; this module
//! reads the files and decides.

use super::connect::os_message;
use super::knownhosts::{self, HostKeyVerdict, KnownHostsFile};
use super::reactor::is_fatal;
use super::sshconfig::{ExpandContext, SshConfig};
use super::{SshOptions, SshSpec};
use anyhow::{anyhow, bail, Context};
use ssh2::{ErrorCode, Session};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

// Connecting

/// Where and as whom to connect, after config and command line are merged.
pub(super) struct Target {
    /// As typed (an alias, maybe).
    pub(super) alias: String,
    /// The real host (HostName), used for TCP and known_hosts.
    pub(super) hostname: String,
    pub(super) port: u16,
    pub(super) user: String,
    pub(super) identity_files: Vec<PathBuf>,
    /// HostKeyAlias: host keys are looked up and stored under this name.
    pub(super) host_key_alias: Option<String>,
    /// UserKnownHostsFile (default `~/.ssh/known_hosts ~/.ssh/known_hosts2`);
    /// a newly accepted key goes to the first.
    pub(super) user_known_hosts: Vec<PathBuf>,
    /// GlobalKnownHostsFile (default `/etc/ssh/ssh_known_hosts{,2}`).
    pub(super) global_known_hosts: Vec<PathBuf>,
}

impl Target {
    /// The target for `spec`; directives we ignore are reported on stderr.
    pub(super) fn resolve(spec: &SshSpec, opts: &SshOptions) -> anyhow::Result<Target> {
        Target::resolve_with(spec, opts, true)
    }

    /// The target for `spec`, saying on stderr which directives we ignore
    /// when `warn`.
    pub(super) fn resolve_with(
        spec: &SshSpec,
        opts: &SshOptions,
        warn: bool,
    ) -> anyhow::Result<Target> {
        let local_user = local_user_name()?;
        let ssh_dir = opts.home.join(".ssh");
        let parse = |text: &str, origin: &str| {
            SshConfig::parse(
                text,
                origin,
                &ssh_dir,
                &opts.home,
                &|p| std::fs::read_to_string(p).ok(),
                &list_dir,
            )
        };
        let from_options = parse(&opts.overrides.config_lines.join("\n"), "--sshoption")?;
        let file = match &opts.overrides.config_file {
            // ssh -F: the named file must be there.
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read the --sshconfig file {}", path.display())
                })?;
                parse(&text, &path.display().to_string())?
            }
            None => {
                let path = ssh_dir.join("config");
                match std::fs::read_to_string(&path) {
                    Ok(text) => parse(&text, &path.display().to_string())?,
                    Err(_) => SshConfig::default(),
                }
            }
        };
        let config = from_options.followed_by(file);
        for ignored in config.ignored_for(&spec.host).iter().filter(|_| warn) {
            eprintln!("resync: ignoring {ignored} (not supported); connecting directly");
        }
        let resolved = config.resolve(
            &spec.host,
            &ExpandContext {
                home: &opts.home,
                local_user: &local_user,
                remote_user: spec.user.as_deref(),
            },
        );
        Ok(Target {
            alias: spec.host.clone(),
            hostname: resolved.hostname.unwrap_or_else(|| spec.host.clone()),
            port: opts.port.or(resolved.port).unwrap_or(22),
            user: spec.user.clone().or(resolved.user).unwrap_or(local_user),
            identity_files: resolved.identity_files,
            host_key_alias: resolved.host_key_alias,
            user_known_hosts: resolved
                .user_known_hosts_files
                .unwrap_or_else(|| vec![ssh_dir.join("known_hosts"), ssh_dir.join("known_hosts2")]),
            global_known_hosts: resolved.global_known_hosts_files.unwrap_or_else(|| {
                vec![
                    PathBuf::from("/etc/ssh/ssh_known_hosts"),
                    PathBuf::from("/etc/ssh/ssh_known_hosts2"),
                ]
            }),
        })
    }

    /// The name known_hosts records this host under: the HostKeyAlias as it
    /// is (OpenSSH adds no port to it), else `host` or `[host]:port`.
    pub(super) fn known_hosts_name(&self) -> String {
        match &self.host_key_alias {
            Some(alias) => alias.clone(),
            None => knownhosts::known_hosts_name(&self.hostname, self.port),
        }
    }

    pub(super) fn label(&self) -> String {
        if self.port == 22 {
            format!("{}@{}", self.user, self.alias)
        } else {
            format!("{}@{}:{}", self.user, self.alias, self.port)
        }
    }

    /// The ssh command that would accept this host's key.
    pub(super) fn ssh_command(&self) -> String {
        if self.port == 22 {
            format!("ssh {}@{}", self.user, self.alias)
        } else {
            format!("ssh -p {} {}@{}", self.port, self.user, self.alias)
        }
    }
}

pub(super) fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// $USER, else $LOGNAME, else our uid's name in /etc/passwd (read directly:
/// getpwuid in a static glibc binary needs the NSS libraries at runtime).
pub(super) fn local_user_name() -> anyhow::Result<String> {
    for var in ["USER", "LOGNAME"] {
        if let Ok(name) = std::env::var(var) {
            if !name.is_empty() {
                return Ok(name);
            }
        }
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id: u32 = fields.nth(1)?.parse().ok()?;
            (id == uid).then(|| name.to_string())
        })
        .next()
        .ok_or_else(|| anyhow!("cannot tell the local user name (uid {uid}); give user@host"))
}

/// The target's known_hosts files (user files, then global ones), read
/// once; files that do not exist are skipped.
pub(super) struct KnownHostsSet {
    /// Where a newly accepted key is written (the first user file), if any.
    pub(super) user_file: Option<PathBuf>,
    pub(super) files: Vec<(String, String)>,
}

impl KnownHostsSet {
    pub(super) fn load(target: &Target) -> KnownHostsSet {
        let files = target
            .user_known_hosts
            .iter()
            .chain(&target.global_known_hosts)
            .filter_map(|p| Some((p.display().to_string(), std::fs::read_to_string(p).ok()?)))
            .collect();
        KnownHostsSet {
            user_file: target.user_known_hosts.first().cloned(),
            files,
        }
    }

    pub(super) fn as_files(&self) -> Vec<KnownHostsFile<'_>> {
        self.files
            .iter()
            .map(|(path, text)| KnownHostsFile { path, text })
            .collect()
    }

    pub(super) fn types_for(&self, target: &Target) -> Vec<String> {
        knownhosts::known_key_types(&self.as_files(), &target.known_hosts_name())
    }

    /// What the files say about the key `blob` the target presented.
    pub(super) fn check(&self, target: &Target, blob: &[u8]) -> HostKeyVerdict {
        knownhosts::check_host_key(&self.as_files(), &target.known_hosts_name(), blob)
    }

    /// Records an accepted key in the first user file, under the target's
    /// known_hosts name; returns that file.
    pub(super) fn accept(&self, target: &Target, blob: &[u8]) -> anyhow::Result<&Path> {
        let name = target.known_hosts_name();
        let Some(file) = &self.user_file else {
            bail!("cannot add the host key for {name}: UserKnownHostsFile is none");
        };
        let line = knownhosts::known_hosts_line(&name, blob)
            .ok_or_else(|| anyhow!("{} sent a malformed host key", target.hostname))?;
        append_known_host(file, &line)
            .with_context(|| format!("cannot add the host key for {name} to {}", file.display()))?;
        Ok(file)
    }
}

pub(super) fn verify_host_key(
    sess: &Session,
    target: &Target,
    known_hosts: &KnownHostsSet,
    opts: &SshOptions,
) -> anyhow::Result<()> {
    let (blob, _) = sess
        .host_key()
        .ok_or_else(|| anyhow!("{} sent no host key", target.hostname))?;
    let key_type = knownhosts::key_type_of_blob(blob).unwrap_or("unknown");
    let fingerprint = sess
        .host_key_hash(ssh2::HashType::Sha256)
        .map(knownhosts::sha256_fingerprint)
        .unwrap_or_else(|| "SHA256:?".into());
    let shown = format!("{} {fingerprint}", knownhosts::key_type_label(key_type));
    let name = target.known_hosts_name();
    let files = match &known_hosts.user_file {
        Some(f) => f.display().to_string(),
        None => "known_hosts".to_string(),
    };
    match known_hosts.check(target, blob) {
        HostKeyVerdict::Known => Ok(()),
        HostKeyVerdict::Revoked { where_ } => {
            bail!(
                "host key for {name} ({shown}) is marked @revoked in {where_}; refusing to connect"
            )
        }
        HostKeyVerdict::Changed { where_ } => bail!(
            "HOST KEY FOR {name} HAS CHANGED: it now presents {shown}, but {where_} holds a \
             different {} key. Someone may be intercepting the connection, or the host was \
             reinstalled. Refusing to connect; if the change is expected, remove the old key \
             with: ssh-keygen -R '{name}'",
            knownhosts::key_type_label(key_type)
        ),
        HostKeyVerdict::Unknown if opts.accept_new_host_key => {
            let file = known_hosts.accept(target, blob)?;
            eprintln!(
                "resync: added {shown} host key for {name} to {}",
                file.display()
            );
            Ok(())
        }
        HostKeyVerdict::Unknown => bail!(
            "host key for {name} is not in {files} ({shown}); connect once with {} to \
             accept it, or pass --accept-new-host-key",
            target.ssh_command()
        ),
    }
}

pub(super) fn append_known_host(path: &Path, line: &str) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let needs_newline = std::fs::read(path)
        .map(|old| !old.is_empty() && !old.ends_with(b"\n"))
        .unwrap_or(false);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    if needs_newline {
        file.write_all(b"\n")?;
    }
    file.write_all(line.as_bytes())
}

pub(super) fn authenticate(
    sess: &Session,
    target: &Target,
    opts: &SshOptions,
) -> anyhow::Result<()> {
    let user = &target.user;
    let where_ = format!("{}@{}:{}", user, target.hostname, target.port);
    let methods = sess
        .auth_methods(user)
        .map(str::to_string)
        .unwrap_or_default();
    if sess.authenticated() {
        return Ok(());
    }
    let mut tried: Vec<String> = Vec::new();

    if !opts.overrides.identities_only
        && std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty())
    {
        match agent_login(sess, user) {
            Ok(true) => return Ok(()),
            Ok(false) => tried.push("ssh-agent (no key accepted)".into()),
            Err(note) => tried.push(format!("ssh-agent ({note})")),
        }
    }

    let ssh_dir = opts.home.join(".ssh");
    let mut keys: Vec<(PathBuf, bool)> = Vec::new();
    let explicit = opts.key.iter().chain(&target.identity_files);
    for path in explicit {
        keys.push((path.clone(), true));
    }
    for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
        keys.push((ssh_dir.join(name), false));
    }
    let mut seen: Vec<PathBuf> = Vec::new();
    for (path, explicit) in keys {
        if seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        let shown = path.display();
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if explicit {
                    tried.push(format!("{shown} (missing)"));
                }
                continue;
            }
            Err(e) => {
                tried.push(format!("{shown} ({})", os_message(&e)));
                continue;
            }
        };
        match knownhosts::private_key_is_encrypted(&text) {
            Ok(false) => {}
            Ok(true) => {
                tried.push(format!(
                    "{shown} (passphrase-protected: add it to ssh-agent)"
                ));
                continue;
            }
            Err(malformed) => {
                tried.push(format!("{shown} ({malformed})"));
                continue;
            }
        }
        match sess.userauth_pubkey_file(user, None, &path, None) {
            Ok(()) if sess.authenticated() => return Ok(()),
            Ok(()) => tried.push(format!("{shown} (rejected)")),
            Err(e) => match e.code() {
                ErrorCode::Session(-18) | ErrorCode::Session(-19) => {
                    tried.push(format!("{shown} (rejected)"))
                }
                ErrorCode::Session(code) if is_fatal(code) => {
                    bail!(
                        "the connection to {where_} broke during login: {}",
                        e.message()
                    )
                }
                _ => tried.push(format!("{shown} (unusable: {})", e.message())),
            },
        }
    }
    let tried = if tried.is_empty() {
        "no ssh-agent and no key files".to_string()
    } else {
        tried.join(", ")
    };
    let offered = if methods.is_empty() {
        String::new()
    } else {
        format!("; the server accepts: {methods}")
    };
    bail!("cannot log in to {where_}: tried {tried}{offered}")
}

/// Ok(true) when an agent key got us in, Ok(false) when none was accepted,
/// Err with a short note when the agent was unusable.
pub(super) fn agent_login(sess: &Session, user: &str) -> Result<bool, String> {
    let mut agent = sess.agent().map_err(|e| e.message().to_string())?;
    agent.connect().map_err(|_| "not reachable".to_string())?;
    agent
        .list_identities()
        .map_err(|e| e.message().to_string())?;
    let identities = agent.identities().map_err(|e| e.message().to_string())?;
    if identities.is_empty() {
        let _ = agent.disconnect();
        return Err("no keys".into());
    }
    let ok = identities
        .iter()
        .any(|id| agent.userauth(user, id).is_ok() && sess.authenticated());
    let _ = agent.disconnect();
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn command_line_overrides_config_and_config_overrides_defaults() {
        let home = tempfile::tempdir().unwrap();
        write(
            &home.path().join(".ssh/config"),
            "Host nas\n HostName 10.213.0.3\n User admin\n Port 2222\n IdentityFile ~/.ssh/nas\n",
        );
        let mut opts = SshOptions::with_home(home.path().to_path_buf());
        let t = Target::resolve(&SshSpec::parse("nas"), &opts).unwrap();
        assert_eq!(
            (t.hostname.as_str(), t.port, t.user.as_str()),
            ("10.213.0.3", 2222, "admin")
        );
        assert_eq!(t.identity_files, vec![home.path().join(".ssh/nas")]);
        assert_eq!(t.label(), "admin@nas:2222");

        opts.port = Some(22);
        let t = Target::resolve(&SshSpec::parse("root@nas"), &opts).unwrap();
        assert_eq!((t.port, t.user.as_str()), (22, "root"));
        assert_eq!(t.label(), "root@nas");
        assert_eq!(t.ssh_command(), "ssh root@nas");
    }

    #[test]
    fn without_config_the_local_user_and_port_22_are_used() {
        let home = tempfile::tempdir().unwrap();
        let opts = SshOptions::with_home(home.path().to_path_buf());
        let t = Target::resolve(&SshSpec::parse("10.213.0.9"), &opts).unwrap();
        assert_eq!(t.port, 22);
        assert_eq!(t.user, local_user_name().unwrap());
        assert_eq!(t.hostname, "10.213.0.9");
    }

    // Host key blobs as ssh-keygen writes them (the same as knownhosts.rs's tests).
    const ED_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIPmm9KAKinPbhuBVdKSvx934RNujIH6LsKup1K6vnWsG";
    const ED_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIHiD1HWOXk5VDyTvPiyInpDv/3sObNoM4vMKIK55zgWh";

    fn blob(b64: &str) -> Vec<u8> {
        knownhosts::base64_decode(b64).unwrap()
    }

    #[test]
    fn host_keys_are_looked_up_under_the_alias_in_the_configured_files() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        write(
            &h.join(".ssh/config"),
            "Host vault\n HostName 127.0.0.1\n Port 2222\n HostKeyAlias vault-key\n \
             UserKnownHostsFile ~/kh/user_a ~/kh/user_b\n GlobalKnownHostsFile ~/kh/global\n\
             Host plain\n HostName 10.213.0.5\n Port 2200\n GlobalKnownHostsFile ~/kh/global\n",
        );
        // The alias's key sits in the second user file; OpenSSH's default
        // file holds nothing, so the old lookup found the host unknown.
        write(
            &h.join("kh/user_b"),
            &format!("vault-key ssh-ed25519 {ED_A}\n"),
        );
        write(
            &h.join("kh/global"),
            &format!("[10.213.0.5]:2200 ssh-ed25519 {ED_A}\n"),
        );
        let opts = SshOptions::with_home(h.to_path_buf());

        let vault = Target::resolve(&SshSpec::parse("root@vault"), &opts).unwrap();
        assert_eq!(vault.known_hosts_name(), "vault-key");
        let set = KnownHostsSet::load(&vault);
        assert_eq!(set.check(&vault, &blob(ED_A)), HostKeyVerdict::Known);
        assert_eq!(set.types_for(&vault), vec!["ssh-ed25519".to_string()]);
        // Another key under the alias is "changed", which no option accepts.
        assert_eq!(
            set.check(&vault, &blob(ED_B)),
            HostKeyVerdict::Changed {
                where_: format!("{}:1", h.join("kh/user_b").display())
            }
        );

        // GlobalKnownHostsFile is read too.
        let plain = Target::resolve(&SshSpec::parse("plain"), &opts).unwrap();
        let set = KnownHostsSet::load(&plain);
        assert_eq!(set.check(&plain, &blob(ED_A)), HostKeyVerdict::Known);
        assert!(matches!(
            set.check(&plain, &blob(ED_B)),
            HostKeyVerdict::Changed { .. }
        ));
    }

    #[test]
    fn an_accepted_key_goes_to_the_first_user_file_under_the_alias() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        write(
            &h.join(".ssh/config"),
            "Host vault\n HostName 127.0.0.1\n Port 2222\n HostKeyAlias vault-key\n \
             UserKnownHostsFile ~/kh/user_a ~/kh/user_b\n",
        );
        let opts = SshOptions::with_home(h.to_path_buf());
        let vault = Target::resolve(&SshSpec::parse("vault"), &opts).unwrap();
        let set = KnownHostsSet::load(&vault);
        assert_eq!(set.check(&vault, &blob(ED_A)), HostKeyVerdict::Unknown);
        assert_eq!(
            set.accept(&vault, &blob(ED_A)).unwrap(),
            h.join("kh/user_a")
        );
        assert_eq!(
            std::fs::read_to_string(h.join("kh/user_a")).unwrap(),
            format!("vault-key ssh-ed25519 {ED_A}\n")
        );
        let again = KnownHostsSet::load(&vault);
        assert_eq!(again.check(&vault, &blob(ED_A)), HostKeyVerdict::Known);
        assert!(matches!(
            again.check(&vault, &blob(ED_B)),
            HostKeyVerdict::Changed { .. }
        ));
    }

    #[test]
    fn user_known_hosts_file_none_cannot_accept() {
        let home = tempfile::tempdir().unwrap();
        write(
            &home.path().join(".ssh/config"),
            "Host x\n UserKnownHostsFile none\n GlobalKnownHostsFile none\n",
        );
        let opts = SshOptions::with_home(home.path().to_path_buf());
        let t = Target::resolve(&SshSpec::parse("x"), &opts).unwrap();
        let set = KnownHostsSet::load(&t);
        assert!(set.files.is_empty());
        let err = set.accept(&t, &blob(ED_A)).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot add the host key for x: UserKnownHostsFile is none"
        );
    }
}
