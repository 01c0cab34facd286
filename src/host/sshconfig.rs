//! OpenSSH's client-side files, parsed the way OpenSSH reads them, without
//! I/O of their own (files come in as text or through a loader closure):
//! `~/.ssh/config` (Host and simple Match blocks, Include, the first value
//! wins), `known_hosts` (plain, wildcard, `[host]:port` and hashed `|1|`
//! entries, `@revoked`), and whether a private key file is encrypted.
//! `ssh.rs` does the reading and the connecting.

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

// ---------------------------------------------------------------------------
// known_hosts

/// The result of looking a presented host key up in known_hosts files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyVerdict {
    /// An entry for this host holds exactly this key.
    Known,
    /// Entries for this host hold a different key of the same type
    /// (`where_` names the first one as "file:line").
    Changed { where_: String },
    /// No entry for this host has a key of this type.
    Unknown,
    /// The key is marked `@revoked` ("file:line").
    Revoked { where_: String },
}

/// One known_hosts file's text with its path (for messages).
pub struct KnownHostsFile<'a> {
    pub path: &'a str,
    pub text: &'a str,
}

/// The name known_hosts uses for a host: `host` on port 22, `[host]:port`
/// otherwise (OpenSSH looks up only this form).
pub fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

struct KnownEntry {
    revoked: bool,
    key: Vec<u8>,
    where_: String,
}

/// The entries in `files` whose host field matches `name` (plain patterns or
/// hashed), skipping `@cert-authority` lines and lines that do not parse.
fn entries_for(files: &[KnownHostsFile<'_>], name: &str) -> Vec<KnownEntry> {
    let name = name.to_ascii_lowercase();
    let mut entries = Vec::new();
    for file in files {
        for (index, line) in file.text.lines().enumerate() {
            let mut fields = line.split_whitespace();
            let Some(mut hosts) = fields.next() else {
                continue;
            };
            if hosts.starts_with('#') {
                continue;
            }
            let mut revoked = false;
            if hosts.starts_with('@') {
                match hosts {
                    "@revoked" => revoked = true,
                    _ => continue,
                }
                let Some(next) = fields.next() else {
                    continue;
                };
                hosts = next;
            }
            let (Some(_key_type), Some(key_b64)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some(key) = base64_decode(key_b64) else {
                continue;
            };
            if host_field_matches(hosts, &name) {
                entries.push(KnownEntry {
                    revoked,
                    key,
                    where_: format!("{}:{}", file.path, index + 1),
                });
            }
        }
    }
    entries
}

fn host_field_matches(field: &str, name: &str) -> bool {
    if let Some(hashed) = field.strip_prefix("|1|") {
        let Some((salt, hash)) = hashed.split_once('|') else {
            return false;
        };
        return match (base64_decode(salt), base64_decode(hash)) {
            (Some(salt), Some(hash)) => hmac_sha1(&salt, name.as_bytes()).as_slice() == hash,
            _ => false,
        };
    }
    let patterns: Vec<String> = field.split(',').map(str::to_string).collect();
    match_pattern_list(name, &patterns) == Some(true)
}

/// The key type name inside an SSH public key blob ("ssh-ed25519", ...).
pub fn key_type_of_blob(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(blob.get(4..4 + len)?).ok()
}

/// Check the key `blob` that `host` (the real host name, port `port`)
/// presented against known_hosts `files`, as OpenSSH would.
pub fn check_host_key(
    files: &[KnownHostsFile<'_>],
    host: &str,
    port: u16,
    blob: &[u8],
) -> HostKeyVerdict {
    let entries = entries_for(files, &known_hosts_name(host, port));
    if let Some(bad) = entries.iter().find(|e| e.revoked && e.key == blob) {
        return HostKeyVerdict::Revoked {
            where_: bad.where_.clone(),
        };
    }
    let presented_type = key_type_of_blob(blob);
    let same_type: Vec<&KnownEntry> = entries
        .iter()
        .filter(|e| !e.revoked && key_type_of_blob(&e.key) == presented_type)
        .collect();
    if same_type.iter().any(|e| e.key == blob) {
        HostKeyVerdict::Known
    } else if let Some(first) = same_type.first() {
        HostKeyVerdict::Changed {
            where_: first.where_.clone(),
        }
    } else {
        HostKeyVerdict::Unknown
    }
}

/// Key types (blob type names) already known for the host, in file order,
/// so the handshake can prefer them the way OpenSSH does.
pub fn known_key_types(files: &[KnownHostsFile<'_>], host: &str, port: u16) -> Vec<String> {
    let mut types: Vec<String> = Vec::new();
    for entry in entries_for(files, &known_hosts_name(host, port)) {
        if let Some(t) = key_type_of_blob(&entry.key) {
            if !entry.revoked && !types.iter().any(|k| k == t) {
                types.push(t.to_string());
            }
        }
    }
    types
}

/// The known_hosts line OpenSSH would append for a new key.
pub fn known_hosts_line(host: &str, port: u16, blob: &[u8]) -> Option<String> {
    let key_type = key_type_of_blob(blob)?;
    Some(format!(
        "{} {} {}\n",
        known_hosts_name(host, port),
        key_type,
        base64_encode(blob, true)
    ))
}

/// OpenSSH's fingerprint text for a SHA-256 digest: "SHA256:" and unpadded
/// base64.
pub fn sha256_fingerprint(digest: &[u8]) -> String {
    format!("SHA256:{}", base64_encode(digest, false))
}

/// A short key type for messages: "ED25519", "ECDSA", "RSA", "DSA".
pub fn key_type_label(key_type: &str) -> String {
    match key_type {
        "ssh-ed25519" => "ED25519".into(),
        "ssh-rsa" => "RSA".into(),
        "ssh-dss" => "DSA".into(),
        t if t.starts_with("ecdsa-sha2-") => "ECDSA".into(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------
// private keys

/// True when a private key file's text says it is passphrase-protected
/// (OpenSSH format with a cipher other than "none", or encrypted PEM).
pub fn private_key_is_encrypted(text: &str) -> bool {
    if text.contains("ENCRYPTED") {
        return true;
    }
    let begin = "-----BEGIN OPENSSH PRIVATE KEY-----";
    let end = "-----END OPENSSH PRIVATE KEY-----";
    let (Some(start), Some(stop)) = (text.find(begin), text.find(end)) else {
        return false;
    };
    let body: String = text[start + begin.len()..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let Some(raw) = base64_decode(&body) else {
        return false;
    };
    let magic = b"openssh-key-v1\0";
    let Some(rest) = raw.strip_prefix(magic.as_slice()) else {
        return false;
    };
    key_type_of_blob(rest).is_some_and(|cipher| cipher != "none")
}

// ---------------------------------------------------------------------------
// base64 and HMAC-SHA1 (for hashed known_hosts names)

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut message = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_be_bytes());
    for block in message.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

fn hmac_sha1(key: &[u8], message: &[u8]) -> [u8; 20] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..20].copy_from_slice(&sha1(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(message);
    let mut outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha1(&inner));
    sha1(&outer)
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
    fn wildmatch_cases() {
        assert!(wildmatch("*", ""));
        assert!(wildmatch("a*b?d", "axxxbcd"));
        assert!(!wildmatch("a*b?d", "axxxbd"));
        assert!(wildmatch("10.213.0.*", "10.213.0.17"));
        assert!(!wildmatch("10.213.0.?", "10.213.0.17"));
        assert!(wildmatch("*.*", "a.b.c"));
    }

    // Blobs as ssh-keygen writes them (keys made for these tests).
    const ED_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIPmm9KAKinPbhuBVdKSvx934RNujIH6LsKup1K6vnWsG";
    const ED_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIHiD1HWOXk5VDyTvPiyInpDv/3sObNoM4vMKIK55zgWh";
    const ECDSA: &str = "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBFYgThkbwmRNsPZcNEhjp3TYOCJnp9yoNYqO84ip9/Io7qYvh4FhLGEJshV9Y3V4ECq7lsRYHf78rUQvNSdEOvY=";

    fn blob(b64: &str) -> Vec<u8> {
        base64_decode(b64).unwrap()
    }

    fn verdict(text: &str, host: &str, port: u16, key: &str) -> HostKeyVerdict {
        let files = [KnownHostsFile { path: "kh", text }];
        check_host_key(&files, host, port, &blob(key))
    }

    #[test]
    fn plain_entries_match_by_host_and_key() {
        let kh = format!("# comment\nnas,10.213.0.3 ssh-ed25519 {ED_A}\n");
        assert_eq!(verdict(&kh, "10.213.0.3", 22, ED_A), HostKeyVerdict::Known);
        assert_eq!(
            verdict(&kh, "10.213.0.3", 22, ED_B),
            HostKeyVerdict::Changed {
                where_: "kh:2".into()
            }
        );
        assert_eq!(
            verdict(&kh, "10.213.0.4", 22, ED_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn other_ports_use_bracket_form_only() {
        let kh = format!("[127.0.0.1]:2299 ssh-ed25519 {ED_A}\n127.0.0.1 ssh-ed25519 {ED_B}\n");
        assert_eq!(verdict(&kh, "127.0.0.1", 2299, ED_A), HostKeyVerdict::Known);
        assert_eq!(verdict(&kh, "127.0.0.1", 22, ED_B), HostKeyVerdict::Known);
        assert_eq!(
            verdict(&kh, "127.0.0.1", 2300, ED_B),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn a_key_of_another_type_is_unknown_not_changed() {
        let kh = format!("nas ecdsa-sha2-nistp256 {ECDSA}\n");
        assert_eq!(verdict(&kh, "nas", 22, ED_A), HostKeyVerdict::Unknown);
        let files = [KnownHostsFile {
            path: "kh",
            text: &kh,
        }];
        assert_eq!(
            known_key_types(&files, "nas", 22),
            vec!["ecdsa-sha2-nistp256"]
        );
    }

    #[test]
    fn hashed_entries_match() {
        // From `ssh-keygen -H` on "10.213.0.3 ssh-ed25519 ED_A" and
        // "[127.0.0.1]:2299 ssh-ed25519 ED_A".
        let kh = format!(
            "|1|2V1dTOZBwy83cZw+Pw1S+E+zReo=|3nBjFatTkPItQmQrUCuwUJ5I4Ng= ssh-ed25519 {ED_A}\n\
             |1|vtq+iU0H6pf3/d33b7kuqZp6mPo=|b/aghNfkjdi27z6sRfdWGQIQNH4= ssh-ed25519 {ED_A}\n"
        );
        assert_eq!(verdict(&kh, "10.213.0.3", 22, ED_A), HostKeyVerdict::Known);
        assert_eq!(verdict(&kh, "127.0.0.1", 2299, ED_A), HostKeyVerdict::Known);
        assert_eq!(
            verdict(&kh, "10.213.0.3", 22, ED_B),
            HostKeyVerdict::Changed {
                where_: "kh:1".into()
            }
        );
        assert_eq!(
            verdict(&kh, "10.213.0.4", 22, ED_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn wildcard_negation_revoked_and_cert_authority_lines() {
        let kh = format!(
            "10.213.0.*,!10.213.0.9 ssh-ed25519 {ED_A}\n\
             @cert-authority * ssh-ed25519 {ED_B}\n\
             @revoked * ssh-ed25519 {ED_B}\n"
        );
        assert_eq!(verdict(&kh, "10.213.0.5", 22, ED_A), HostKeyVerdict::Known);
        assert_eq!(
            verdict(&kh, "10.213.0.9", 22, ED_A),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            verdict(&kh, "10.213.0.5", 22, ED_B),
            HostKeyVerdict::Revoked {
                where_: "kh:3".into()
            }
        );
    }

    #[test]
    fn new_host_line_is_openssh_format() {
        assert_eq!(
            known_hosts_line("127.0.0.1", 2299, &blob(ED_A)).unwrap(),
            format!("[127.0.0.1]:2299 ssh-ed25519 {ED_A}\n")
        );
        assert_eq!(
            known_hosts_line("nas", 22, &blob(ED_A)).unwrap(),
            format!("nas ssh-ed25519 {ED_A}\n")
        );
    }

    #[test]
    fn base64_round_trips_and_fingerprint_is_unpadded() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&data, true)).unwrap(), data);
            assert_eq!(base64_decode(&base64_encode(&data, false)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"ab", true), "YWI=");
        assert_eq!(sha256_fingerprint(b"ab"), "SHA256:YWI");
        assert!(base64_decode("a$b").is_none());
    }

    #[test]
    fn sha1_and_hmac_match_published_vectors() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // RFC 2202 test cases 1 and 2.
        assert_eq!(
            hex(&hmac_sha1(&[0x0b; 20], b"Hi There")),
            "b617318655057264e28bc0b6fb378c8ef146be00"
        );
        assert_eq!(
            hex(&hmac_sha1(b"Jefe", b"what do ya want for nothing?")),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }

    #[test]
    fn encrypted_private_keys_are_recognised() {
        // Headers of `ssh-keygen -t ed25519 -N ''` and `-N secret` keys.
        let plain = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
            b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n\
            -----END OPENSSH PRIVATE KEY-----\n";
        let locked = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
            b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABALinLxsN\n\
            -----END OPENSSH PRIVATE KEY-----\n";
        assert!(!private_key_is_encrypted(plain));
        assert!(private_key_is_encrypted(locked));
        assert!(private_key_is_encrypted(
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
        ));
    }
}
