//! OpenSSH's client-side files, parsed the way OpenSSH reads them, without
//! I/O of their own (files come in as text or through a loader closure):
//! `~/.ssh/config` (Host and simple Match blocks, Include, the first value
//! wins). Host keys and key files are `knownhosts.rs`'s; `auth.rs` does the
//! reading and the connecting.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// ssh_config

/// A parsed ssh_config: every directive with the block conditions it sits
/// under (an Include inside a Host block keeps that block's condition).
#[derive(Debug, Default, Clone)]
pub struct SshConfig {
    directives: Vec<Directive>,
}

#[derive(Debug, Clone)]
struct Directive {
    conditions: Vec<Condition>,
    keyword: String,
    args: Vec<String>,
    origin: String,
}

#[derive(Debug, Clone)]
enum Condition {
    /// `Host pat1 pat2 !pat3`
    Host(Vec<String>),
    /// `Match ...`: only `all`, `host` and `originalhost` are understood;
    /// any other criterion makes the block never apply.
    Match(Vec<MatchCriterion>),
}

#[derive(Debug, Clone)]
enum MatchCriterion {
    All,
    Host(Vec<String>),
    OriginalHost(Vec<String>),
    Unsupported,
}

/// What the config says about one host, tokens expanded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResolvedConfig {
    /// HostName (the real address), if set.
    pub hostname: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    /// IdentityFile values in order, `~` and `%` tokens expanded.
    pub identity_files: Vec<PathBuf>,
    /// UserKnownHostsFile's files (`~` and `%` expanded; empty for `none`),
    /// if set.
    pub user_known_hosts_files: Option<Vec<PathBuf>>,
    /// GlobalKnownHostsFile's files, likewise.
    pub global_known_hosts_files: Option<Vec<PathBuf>>,
    /// HostKeyAlias: the name host keys are looked up and stored under.
    pub host_key_alias: Option<String>,
}

/// Values that `%` tokens and `~` expand to.
#[derive(Debug, Clone)]
pub struct ExpandContext<'a> {
    pub home: &'a Path,
    pub local_user: &'a str,
    /// The remote user as far as the command line knows it (`user@`).
    pub remote_user: Option<&'a str>,
}

const MAX_INCLUDE_DEPTH: usize = 16;

impl SshConfig {
    /// Parse `text` (the file `origin`, for messages). `load` reads an
    /// included file: it gets an absolute path or glob-expanded path and
    /// returns None when the file does not exist. Relative Include paths are
    /// taken from `ssh_dir` (`~/.ssh`), like OpenSSH does for the user file.
    pub fn parse(
        text: &str,
        origin: &str,
        ssh_dir: &Path,
        home: &Path,
        load: &dyn Fn(&Path) -> Option<String>,
        list_dir: &dyn Fn(&Path) -> Vec<String>,
    ) -> anyhow::Result<SshConfig> {
        let mut config = SshConfig::default();
        let env = ParseEnv {
            ssh_dir,
            home,
            load,
            list_dir,
        };
        config.parse_into(text, origin, &[], &env, 0)?;
        Ok(config)
    }

    /// This config's directives, then `later`'s: where both set a keyword,
    /// this one wins (ssh's `-o` options before its config file).
    pub fn followed_by(mut self, later: SshConfig) -> SshConfig {
        self.directives.extend(later.directives);
        self
    }

    #[cfg(test)]
    /// Parse text that has no Include directives to follow (tests, or a
    /// config read from elsewhere).
    pub fn parse_str(text: &str) -> anyhow::Result<SshConfig> {
        let nowhere = Path::new("/nonexistent");
        SshConfig::parse(text, "config", nowhere, nowhere, &|_| None, &|_| Vec::new())
    }

    fn parse_into(
        &mut self,
        text: &str,
        origin: &str,
        outer: &[Condition],
        env: &ParseEnv<'_>,
        depth: usize,
    ) -> anyhow::Result<()> {
        if depth > MAX_INCLUDE_DEPTH {
            bail!("{origin}: Include nested more than {MAX_INCLUDE_DEPTH} deep");
        }
        let mut block: Option<Condition> = None;
        for (index, line) in text.lines().enumerate() {
            let at = format!("{origin}:{}", index + 1);
            let Some((keyword, args)) = split_line(line).with_context(|| at.clone())? else {
                continue;
            };
            let conditions = |block: &Option<Condition>| {
                let mut all = outer.to_vec();
                all.extend(block.iter().cloned());
                all
            };
            match keyword.as_str() {
                "host" => {
                    if args.is_empty() {
                        bail!("{at}: Host needs at least one pattern");
                    }
                    block = Some(Condition::Host(args));
                }
                "match" => block = Some(Condition::Match(parse_match(&args))),
                "include" => {
                    if args.is_empty() {
                        bail!("{at}: Include needs a file name");
                    }
                    let inner_conditions = conditions(&block);
                    for pattern in &args {
                        let path = expand_tilde(pattern, env.home);
                        let path = if path.is_absolute() {
                            path
                        } else {
                            env.ssh_dir.join(path)
                        };
                        for file in glob(&path, env.list_dir) {
                            if let Some(included) = (env.load)(&file) {
                                let name = file.display().to_string();
                                self.parse_into(
                                    &included,
                                    &name,
                                    &inner_conditions,
                                    env,
                                    depth + 1,
                                )?;
                            }
                        }
                    }
                }
                _ => {
                    if keyword == "port" {
                        let value = args.first().map(String::as_str).unwrap_or("");
                        if value.parse::<u16>().map_or(true, |p| p == 0) {
                            bail!("{at}: bad Port {value:?}");
                        }
                    }
                    self.directives.push(Directive {
                        conditions: conditions(&block),
                        keyword,
                        args,
                        origin: at,
                    });
                }
            }
        }
        Ok(())
    }

    /// The settings for `host` (as typed on the command line): the first
    /// value of each keyword wins, IdentityFile accumulates.
    pub fn resolve(&self, host: &str, ctx: &ExpandContext<'_>) -> ResolvedConfig {
        let original = host.to_ascii_lowercase();
        let mut resolved = ResolvedConfig::default();
        let mut identity_raw: Vec<String> = Vec::new();
        let mut user_kh_raw: Option<Vec<String>> = None;
        let mut global_kh_raw: Option<Vec<String>> = None;
        for directive in &self.directives {
            let current = resolved
                .hostname
                .as_deref()
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| original.clone());
            if !directive
                .conditions
                .iter()
                .all(|c| condition_applies(c, &original, &current))
            {
                continue;
            }
            let Some(value) = directive.args.first() else {
                continue;
            };
            match directive.keyword.as_str() {
                "hostname" if resolved.hostname.is_none() => {
                    resolved.hostname = Some(expand_percent(value, &[('h', &original)]));
                }
                "user" if resolved.user.is_none() => resolved.user = Some(value.clone()),
                "port" if resolved.port.is_none() => resolved.port = value.parse().ok(),
                "identityfile" if !value.eq_ignore_ascii_case("none") => {
                    identity_raw.push(value.clone());
                }
                "userknownhostsfile" if user_kh_raw.is_none() => {
                    user_kh_raw = Some(files_or_none(&directive.args));
                }
                "globalknownhostsfile" if global_kh_raw.is_none() => {
                    global_kh_raw = Some(files_or_none(&directive.args));
                }
                "hostkeyalias" if resolved.host_key_alias.is_none() => {
                    resolved.host_key_alias = Some(value.clone());
                }
                _ => {}
            }
        }
        let hostname = resolved
            .hostname
            .clone()
            .unwrap_or_else(|| original.clone());
        let remote_user = ctx
            .remote_user
            .map(str::to_string)
            .or_else(|| resolved.user.clone())
            .unwrap_or_else(|| ctx.local_user.to_string());
        let home = ctx.home.display().to_string();
        for raw in identity_raw {
            let expanded = expand_percent(
                &raw,
                &[
                    ('h', &hostname),
                    ('r', &remote_user),
                    ('u', ctx.local_user),
                    ('d', &home),
                    ('n', &original),
                ],
            );
            let path = expand_tilde(&expanded, ctx.home);
            if !resolved.identity_files.contains(&path) {
                resolved.identity_files.push(path);
            }
        }
        // OpenSSH expands %k (the alias, else the host as typed) here too.
        let key_name = resolved
            .host_key_alias
            .clone()
            .unwrap_or_else(|| original.clone());
        let expand_files = |raw: Vec<String>| -> Vec<PathBuf> {
            raw.iter()
                .map(|f| {
                    let expanded = expand_percent(
                        f,
                        &[
                            ('h', &hostname),
                            ('r', &remote_user),
                            ('u', ctx.local_user),
                            ('d', &home),
                            ('n', &original),
                            ('k', &key_name),
                        ],
                    );
                    expand_tilde(&expanded, ctx.home)
                })
                .collect()
        };
        resolved.user_known_hosts_files = user_kh_raw.map(expand_files);
        resolved.global_known_hosts_files = global_kh_raw.map(expand_files);
        resolved
    }

    /// Directives the resolver reads but that were given with an unusable
    /// value, or directives we ignore that change how OpenSSH would connect
    /// (ProxyJump, ProxyCommand), for `host`: "file:line: Keyword".
    pub fn ignored_for(&self, host: &str) -> Vec<String> {
        let original = host.to_ascii_lowercase();
        self.directives
            .iter()
            .filter(|d| matches!(d.keyword.as_str(), "proxyjump" | "proxycommand"))
            .filter(|d| {
                d.conditions
                    .iter()
                    .all(|c| condition_applies(c, &original, &original))
            })
            .filter(|d| {
                !d.args
                    .first()
                    .is_some_and(|v| v.eq_ignore_ascii_case("none"))
            })
            .map(|d| format!("{}: {}", d.origin, d.keyword))
            .collect()
    }
}

/// One `--sshoption`/`-o` (syncoid passes them to ssh as `-o KEY=VALUE`),
/// sorted by where resync honours it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLineOption {
    /// Port, User, IdentityFile, UserKnownHostsFile, HostKeyAlias: read as
    /// the first line of the config (so it wins over the file), in
    /// ssh_config syntax.
    ConfigLine(String),
    /// `IdentitiesOnly yes|no`.
    IdentitiesOnly(bool),
    /// `ConnectTimeout SECONDS`.
    ConnectTimeout(u64),
    /// `ServerAliveInterval SECONDS` (0: off).
    ServerAliveInterval(u64),
    /// `StrictHostKeyChecking`: `on` for `accept-new`, and for `no`/`off`,
    /// which resync narrows to accept-new (`narrowed`: a changed key is
    /// still refused).
    AcceptNewHostKey { on: bool, narrowed: bool },
}

/// The options `--sshoption` understands, as ssh spells them.
pub const COMMAND_LINE_OPTIONS: &[&str] = &[
    "Port",
    "User",
    "IdentityFile",
    "IdentitiesOnly",
    "ConnectTimeout",
    "ServerAliveInterval",
    "StrictHostKeyChecking",
    "UserKnownHostsFile",
    "HostKeyAlias",
];

/// Parses one `--sshoption` value, `Key=Value` or `Key Value` as ssh
/// takes it; an option resync cannot honour is refused by name.
pub fn parse_command_line_option(text: &str) -> anyhow::Result<CommandLineOption> {
    let text = text.trim();
    let (key, value) = match text.find(|c: char| c == '=' || c.is_whitespace()) {
        Some(i) => (
            &text[..i],
            text[i..].trim_start_matches(|c: char| c == '=' || c.is_whitespace()),
        ),
        None => (text, ""),
    };
    let value = value.trim();
    if key.is_empty() || value.is_empty() {
        bail!("--sshoption {text:?}: want KEY=VALUE, e.g. Port=2222");
    }
    if value.chars().any(|c| c.is_control() || c == '"') {
        bail!("--sshoption {text:?}: the value must be plain text");
    }
    let Some(known) = COMMAND_LINE_OPTIONS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(key))
    else {
        bail!(
            "--sshoption {key} is not supported by resync (it connects with libssh2, not ssh); \
             supported: {}",
            COMMAND_LINE_OPTIONS.join(", ")
        );
    };
    let yes_no = |v: &str| match v.to_ascii_lowercase().as_str() {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(anyhow::anyhow!("--sshoption {text:?}: want yes or no")),
    };
    let seconds = |v: &str| {
        v.parse::<u64>()
            .ok()
            .filter(|n| *n <= 86_400)
            .ok_or_else(|| anyhow::anyhow!("--sshoption {text:?}: want a number of seconds"))
    };
    Ok(match *known {
        "IdentitiesOnly" => CommandLineOption::IdentitiesOnly(yes_no(value)?),
        "ConnectTimeout" => CommandLineOption::ConnectTimeout(seconds(value)?),
        "ServerAliveInterval" => CommandLineOption::ServerAliveInterval(seconds(value)?),
        "StrictHostKeyChecking" => match value.to_ascii_lowercase().as_str() {
            "yes" | "ask" => CommandLineOption::AcceptNewHostKey {
                on: false,
                narrowed: false,
            },
            "accept-new" => CommandLineOption::AcceptNewHostKey {
                on: true,
                narrowed: false,
            },
            "no" | "off" => CommandLineOption::AcceptNewHostKey {
                on: true,
                narrowed: true,
            },
            _ => bail!("--sshoption {text:?}: want yes, accept-new or no"),
        },
        "Port" => {
            value
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| anyhow::anyhow!("--sshoption {text:?}: not a port number"))?;
            CommandLineOption::ConfigLine(format!("Port {value}"))
        }
        other => {
            if value.split_whitespace().count() > 1 && other != "UserKnownHostsFile" {
                bail!("--sshoption {text:?}: want one value");
            }
            CommandLineOption::ConfigLine(format!("{other} {value}"))
        }
    })
}

struct ParseEnv<'a> {
    ssh_dir: &'a Path,
    home: &'a Path,
    load: &'a dyn Fn(&Path) -> Option<String>,
    list_dir: &'a dyn Fn(&Path) -> Vec<String>,
}

fn parse_match(args: &[String]) -> Vec<MatchCriterion> {
    let mut criteria = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let list = |w: Option<&String>| -> Vec<String> {
            w.map(|l| l.split(',').map(str::to_string).collect())
                .unwrap_or_default()
        };
        criteria.push(match word.to_ascii_lowercase().as_str() {
            "all" => MatchCriterion::All,
            "host" => MatchCriterion::Host(list(words.next())),
            "originalhost" => MatchCriterion::OriginalHost(list(words.next())),
            _ => MatchCriterion::Unsupported,
        });
    }
    criteria
}

fn condition_applies(condition: &Condition, original: &str, current: &str) -> bool {
    match condition {
        Condition::Host(patterns) => match_pattern_list(original, patterns) == Some(true),
        Condition::Match(criteria) => {
            !criteria.is_empty()
                && criteria.iter().all(|c| match c {
                    MatchCriterion::All => true,
                    MatchCriterion::Host(list) => match_pattern_list(current, list) == Some(true),
                    MatchCriterion::OriginalHost(list) => {
                        match_pattern_list(original, list) == Some(true)
                    }
                    MatchCriterion::Unsupported => false,
                })
        }
    }
}

/// Split one config line into a lowercase keyword and its arguments.
/// `Keyword value`, `Keyword=value` and `Keyword = value` are all accepted;
/// arguments may be double- or single-quoted; an unquoted `#` starting a
/// word begins a comment. Blank and comment lines give None.
fn split_line(line: &str) -> anyhow::Result<Option<(String, Vec<String>)>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let keyword = line[..end].to_ascii_lowercase();
    let mut rest = line[end..].trim_start();
    if let Some(stripped) = rest.strip_prefix('=') {
        rest = stripped.trim_start();
    }
    Ok(Some((keyword, split_args(rest)?)))
}

fn split_args(text: &str) -> anyhow::Result<Vec<String>> {
    let mut args = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => break,
            _ => {}
        }
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '"' | '\'' => loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\\') if chars.peek() == Some(&c) => word.push(c),
                        Some(other) => word.push(other),
                        None => bail!("unterminated quote"),
                    }
                },
                '\\' if matches!(chars.peek(), Some('"' | '\'' | '\\')) => {
                    word.extend(chars.next());
                }
                _ => word.push(c),
            }
        }
        args.push(word);
    }
    Ok(args)
}

/// A known_hosts file list: the words, or none for `none`.
fn files_or_none(args: &[String]) -> Vec<String> {
    if args.len() == 1 && args[0].eq_ignore_ascii_case("none") {
        Vec::new()
    } else {
        args.to_vec()
    }
}

/// Expand `%c` tokens from `values`; `%%` is a literal `%`. Unknown tokens
/// are left as they are.
fn expand_percent(text: &str, values: &[(char, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(token) => match values.iter().find(|(t, _)| *t == token) {
                Some((_, value)) => out.push_str(value),
                None => {
                    out.push('%');
                    out.push(token);
                }
            },
            None => out.push('%'),
        }
    }
    out
}

/// `~` and `~/x` become paths under `home`.
pub fn expand_tilde(text: &str, home: &Path) -> PathBuf {
    if text == "~" {
        home.to_path_buf()
    } else if let Some(rest) = text.strip_prefix("~/") {
        home.join(rest)
    } else {
        PathBuf::from(text)
    }
}

/// Expand `*` and `?` in each path component, sorted like glob(3). A path
/// without wildcards comes back as it is (existence is the loader's job).
fn glob(path: &Path, list_dir: &dyn Fn(&Path) -> Vec<String>) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::new()];
    for component in path.components() {
        let part = component.as_os_str().to_string_lossy();
        if !part.contains(['*', '?']) {
            for p in &mut found {
                p.push(component);
            }
            continue;
        }
        let mut next = Vec::new();
        for dir in &found {
            let mut names: Vec<String> = list_dir(dir)
                .into_iter()
                .filter(|name| !name.starts_with('.') || part.starts_with('.'))
                .filter(|name| wildmatch(&part, name))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| dir.join(n)));
        }
        found = next;
    }
    found
}

/// `*` and `?` wildcard match (the whole text).
pub fn wildmatch(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// OpenSSH's pattern lists: Some(false) if a `!pattern` matches, Some(true)
/// if a plain pattern matches, None if nothing matches. Case-insensitive.
pub fn match_pattern_list(name: &str, patterns: &[String]) -> Option<bool> {
    let name = name.to_ascii_lowercase();
    let mut matched = None;
    for pattern in patterns {
        let pattern = pattern.to_ascii_lowercase();
        if let Some(negated) = pattern.strip_prefix('!') {
            if wildmatch(negated, &name) {
                return Some(false);
            }
        } else if wildmatch(&pattern, &name) {
            matched = Some(true);
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ctx(home: &Path) -> ExpandContext<'_> {
        ExpandContext {
            home,
            local_user: "alice",
            remote_user: None,
        }
    }

    const CONFIG: &str = r#"
# resync test config
Host nas nas.lan
    HostName 10.213.0.3
    User root
    IdentityFile ~/.ssh/nas_ed25519

Host backup-*  !backup-old
    Port 2222
    User=backup
    IdentityFile "/keys/%r at %h"

Host *.example.com
    HostName %h.internal
    Port = 2200

Match originalhost web1
    User deploy

Match exec "true"
    User nobody

Host *
    User fallback
    IdentityFile ~/.ssh/id_default
    ServerAliveInterval 15
"#;

    #[test]
    fn alias_gives_hostname_user_and_identity() {
        let cfg = SshConfig::parse_str(CONFIG).unwrap();
        let r = cfg.resolve("NAS", &ctx(Path::new("/home/alice")));
        assert_eq!(r.hostname.as_deref(), Some("10.213.0.3"));
        assert_eq!(r.user.as_deref(), Some("root"));
        assert_eq!(r.port, None);
        assert_eq!(
            r.identity_files,
            vec![
                PathBuf::from("/home/alice/.ssh/nas_ed25519"),
                PathBuf::from("/home/alice/.ssh/id_default")
            ]
        );
    }

    #[test]
    fn wildcards_negation_and_tokens() {
        let cfg = SshConfig::parse_str(CONFIG).unwrap();
        let home = Path::new("/root");
        let r = cfg.resolve("backup-2", &ctx(home));
        assert_eq!(r.port, Some(2222));
        assert_eq!(r.user.as_deref(), Some("backup"));
        assert_eq!(
            r.identity_files[0],
            PathBuf::from("/keys/backup at backup-2")
        );

        let old = cfg.resolve("backup-old", &ctx(home));
        assert_eq!(old.port, None);
        assert_eq!(old.user.as_deref(), Some("fallback"));

        let web = cfg.resolve("db.example.com", &ctx(home));
        assert_eq!(web.hostname.as_deref(), Some("db.example.com.internal"));
        assert_eq!(web.port, Some(2200));
    }

    #[test]
    fn command_line_user_feeds_percent_r() {
        let cfg = SshConfig::parse_str(CONFIG).unwrap();
        let home = Path::new("/root");
        let r = cfg.resolve(
            "backup-9",
            &ExpandContext {
                home,
                local_user: "alice",
                remote_user: Some("ops"),
            },
        );
        assert_eq!(r.identity_files[0], PathBuf::from("/keys/ops at backup-9"));
    }

    #[test]
    fn match_originalhost_applies_and_unsupported_match_never_does() {
        let cfg = SshConfig::parse_str(CONFIG).unwrap();
        let r = cfg.resolve("web1", &ctx(Path::new("/root")));
        assert_eq!(r.user.as_deref(), Some("deploy"));
        let other = cfg.resolve("web2", &ctx(Path::new("/root")));
        assert_eq!(other.user.as_deref(), Some("fallback"));
    }

    #[test]
    fn first_value_wins_even_from_later_general_blocks() {
        let cfg = SshConfig::parse_str("Host *\n User first\nHost x\n User second\n").unwrap();
        assert_eq!(
            cfg.resolve("x", &ctx(Path::new("/r"))).user.as_deref(),
            Some("first")
        );
    }

    #[test]
    fn directives_before_any_host_apply_everywhere() {
        let cfg = SshConfig::parse_str("Port 2022\nHost y\n Port 1\n").unwrap();
        assert_eq!(cfg.resolve("y", &ctx(Path::new("/r"))).port, Some(2022));
    }

    #[test]
    fn bad_port_is_an_error_with_location() {
        let err = SshConfig::parse_str("Host a\n  Port http\n").unwrap_err();
        assert_eq!(format!("{err:#}"), "config:2: bad Port \"http\"");
    }

    #[test]
    fn include_with_glob_inherits_the_enclosing_block() {
        let files: HashMap<&str, &str> = HashMap::from([
            ("/h/.ssh/config.d/10-nas", "Host nas\n HostName 10.0.0.9\n"),
            ("/h/.ssh/config.d/20-all", "Host *\n User inc\n"),
            ("/h/.ssh/only-db", "Port 3333\n"),
        ]);
        let load = |p: &Path| files.get(p.to_str().unwrap()).map(|s| s.to_string());
        let list = |dir: &Path| -> Vec<String> {
            files
                .keys()
                .filter_map(|k| Path::new(k).strip_prefix(dir).ok())
                .filter(|rest| rest.components().count() == 1)
                .map(|rest| rest.display().to_string())
                .collect()
        };
        let text = "Include config.d/*\nHost db\n Include ~/.ssh/only-db\n";
        let cfg = SshConfig::parse(
            text,
            "/h/.ssh/config",
            Path::new("/h/.ssh"),
            Path::new("/h"),
            &load,
            &list,
        )
        .unwrap();
        let home = Path::new("/h");
        let nas = cfg.resolve("nas", &ctx(home));
        assert_eq!(nas.hostname.as_deref(), Some("10.0.0.9"));
        assert_eq!(nas.user.as_deref(), Some("inc"));
        assert_eq!(nas.port, None);
        assert_eq!(cfg.resolve("db", &ctx(home)).port, Some(3333));
    }

    #[test]
    fn proxy_jump_is_reported_as_ignored() {
        let cfg = SshConfig::parse_str("Host far\n ProxyJump bastion\n").unwrap();
        assert_eq!(cfg.ignored_for("far"), vec!["config:2: proxyjump"]);
        assert!(cfg.ignored_for("near").is_empty());
    }

    #[test]
    fn command_line_options_are_sorted_or_refused_by_name() {
        use CommandLineOption as O;
        let p = |t: &str| parse_command_line_option(t).unwrap();
        assert_eq!(p("Port=2222"), O::ConfigLine("Port 2222".into()));
        assert_eq!(p("port 2222"), O::ConfigLine("Port 2222".into()));
        assert_eq!(p("User=backup"), O::ConfigLine("User backup".into()));
        assert_eq!(
            p("IdentityFile=~/.ssh/backup"),
            O::ConfigLine("IdentityFile ~/.ssh/backup".into())
        );
        assert_eq!(
            p("UserKnownHostsFile=/dev/null"),
            O::ConfigLine("UserKnownHostsFile /dev/null".into())
        );
        assert_eq!(
            p("HostKeyAlias=nas"),
            O::ConfigLine("HostKeyAlias nas".into())
        );
        assert_eq!(p("IdentitiesOnly=yes"), O::IdentitiesOnly(true));
        assert_eq!(p("ConnectTimeout=5"), O::ConnectTimeout(5));
        assert_eq!(p("ServerAliveInterval=10"), O::ServerAliveInterval(10));
        let accept = |on, narrowed| O::AcceptNewHostKey { on, narrowed };
        assert_eq!(p("StrictHostKeyChecking=no"), accept(true, true));
        assert_eq!(p("StrictHostKeyChecking=accept-new"), accept(true, false));
        assert_eq!(p("StrictHostKeyChecking=yes"), accept(false, false));
        for (bad, want) in [
            ("Compression=yes", "Compression is not supported"),
            ("ProxyJump=bastion", "ProxyJump is not supported"),
            ("ProxyCommand=nc %h %p", "ProxyCommand is not supported"),
            ("Port=0", "not a port"),
            ("Port=x", "not a port"),
            ("ConnectTimeout=soon", "seconds"),
            ("IdentitiesOnly=maybe", "yes or no"),
            ("Port", "KEY=VALUE"),
            ("=5", "KEY=VALUE"),
            ("User=a b", "one value"),
        ] {
            let got = format!("{:#}", parse_command_line_option(bad).unwrap_err());
            assert!(got.contains(want), "{bad}: {got}");
            assert!(!got.contains('\n'), "{got}");
        }
    }

    #[test]
    fn options_before_the_config_file_win() {
        let opts = SshConfig::parse_str("Port 2222\nUser alice").unwrap();
        let file = SshConfig::parse_str("Host nas\n  Port 22\n  HostName 10.0.0.9").unwrap();
        let home = PathBuf::from("/home/x");
        let r = opts.followed_by(file).resolve("nas", &ctx(&home));
        assert_eq!(r.port, Some(2222));
        assert_eq!(r.user.as_deref(), Some("alice"));
        assert_eq!(r.hostname.as_deref(), Some("10.0.0.9"));
    }

    #[test]
    fn wildmatch_cases() {
        assert!(wildmatch("*", ""));
        assert!(wildmatch("a*b?d", "axxxbcd"));
        assert!(!wildmatch("a*b?d", "axxxbd"));
        assert!(wildmatch("10.213.0.*", "10.213.0.17"));
        assert!(!wildmatch("10.213.0.?", "10.213.0.17"));
        assert!(wildmatch("*.*", "a.b.c"));
    }

    #[test]
    fn known_hosts_files_and_host_key_alias_are_read() {
        let cfg = SshConfig::parse_str(
            "Host vault\n    HostName 10.213.0.7\n    HostKeyAlias vault-key\n    \
             UserKnownHostsFile ~/.ssh/kh_a /etc/kh_%k\n    GlobalKnownHostsFile none\n\
             Host *\n    UserKnownHostsFile ~/.ssh/ignored\n    GlobalKnownHostsFile /etc/g1 /etc/g2\n",
        )
        .unwrap();
        let r = cfg.resolve("vault", &ctx(Path::new("/home/alice")));
        assert_eq!(r.host_key_alias.as_deref(), Some("vault-key"));
        assert_eq!(
            r.user_known_hosts_files,
            Some(vec![
                PathBuf::from("/home/alice/.ssh/kh_a"),
                PathBuf::from("/etc/kh_vault-key")
            ])
        );
        assert_eq!(r.global_known_hosts_files, Some(vec![]));
        let other = cfg.resolve("nas", &ctx(Path::new("/root")));
        assert_eq!(other.host_key_alias, None);
        assert_eq!(
            other.global_known_hosts_files,
            Some(vec![PathBuf::from("/etc/g1"), PathBuf::from("/etc/g2")])
        );
        assert_eq!(
            cfg.resolve("x", &ctx(Path::new("/r")))
                .user_known_hosts_files,
            Some(vec![PathBuf::from("/r/.ssh/ignored")])
        );
    }
}
