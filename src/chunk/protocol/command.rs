//! The hidden helper subcommands as one typed value: [`HelperCommand`] is
//! what the orchestrator asks a host to run (`to_argv`) and what the helper
//! dispatch on that host reads back (`parse`), so each command line is
//! spelled in exactly one place and the two ends cannot drift apart. The
//! argv goes to `Host::run`/`spawn` as separate words (quoted by the host
//! layer where a shell is involved); nothing here builds a shell string.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::markers::parse_u64;
use super::CHUNK_SIZE_MAX;
use crate::compress::Compress;

/// Hidden subcommands that `main` hands to the helper dispatch.
pub const SUBCOMMANDS: &[&str] = &[SEND, RECV, START, CLEAN, SERVE, OWN, SESSIONS, MANIFEST];

const SEND: &str = "__chunk-send";
const RECV: &str = "__chunk-recv";
const START: &str = "__chunk-start";
const CLEAN: &str = "__chunk-clean";
const SERVE: &str = "__chunk-serve";
const OWN: &str = "__chunk-own";
const SESSIONS: &str = "__chunk-sessions";
const MANIFEST: &str = "__chunk-manifest";

/// Which session folders `__chunk-sessions` looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One folder.
    Dir(String),
    /// Every session folder in `tmpdir` (whose manifest names `target`).
    Tmpdir {
        tmpdir: String,
        target: Option<String>,
    },
}

/// One helper command line (see the protocol doc, "Command lines").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelperCommand {
    /// `__chunk-send --dir D --chunk-size BYTES --window N --timeout SECS [--compress SPEC] -- ARGV`
    Send {
        dir: String,
        chunk_size: u64,
        window: u64,
        timeout: Duration,
        /// `--compress`: chunk files hold frames (absent: `none`).
        compress: Compress,
        argv: Vec<String>,
    },
    /// `__chunk-recv --dir D --timeout SECS [--framed] -- ARGV`
    Recv {
        dir: String,
        timeout: Duration,
        /// `--framed`: chunk files hold frames to decode.
        framed: bool,
        argv: Vec<String>,
    },
    /// `__chunk-start --dir D -- <Send or Recv>`: creates D, starts the
    /// helper detached, prints its pid.
    Start {
        dir: String,
        helper: Box<HelperCommand>,
    },
    /// `__chunk-clean [--tmpdir T] [--min-age SECS]`
    Clean {
        tmpdir: Option<String>,
        min_age: Option<Duration>,
    },
    /// `__chunk-serve --dir D --timeout SECS`
    Serve { dir: String, timeout: Duration },
    /// `__chunk-own --dir D --grace SECS --info OWNER [--manifest TEXT]`
    Own {
        dir: String,
        grace: Option<Duration>,
        info: String,
        manifest: Option<String>,
    },
    /// `__chunk-sessions (--dir D | --tmpdir T [--target DS]) [--remove-dead] [--cancel]`
    Sessions {
        scope: Scope,
        remove_dead: bool,
        cancel: bool,
    },
    /// `__chunk-manifest --dir D --manifest TEXT`
    Manifest { dir: String, manifest: String },
}

impl HelperCommand {
    /// The full argv: our binary `exe`, the subcommand, its options.
    pub fn to_argv(&self, exe: &str) -> Vec<String> {
        let mut argv = vec![exe.to_string()];
        self.push_args(&mut argv);
        argv
    }

    /// The subcommand and its options, without the program.
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.push_args(&mut out);
        out
    }

    fn push_args(&self, out: &mut Vec<String>) {
        fn opt(out: &mut Vec<String>, key: &str, value: &str) {
            out.push(key.to_string());
            out.push(value.to_string());
        }
        let secs = |d: &Duration| d.as_secs().max(1).to_string();
        match self {
            HelperCommand::Send {
                dir,
                chunk_size,
                window,
                timeout,
                compress,
                argv,
            } => {
                out.push(SEND.into());
                opt(out, "--dir", dir);
                opt(out, "--chunk-size", &chunk_size.to_string());
                opt(out, "--window", &window.to_string());
                opt(out, "--timeout", &secs(timeout));
                if compress.is_on() {
                    opt(out, "--compress", &compress.spec());
                }
                out.push("--".into());
                out.extend(argv.iter().cloned());
            }
            HelperCommand::Recv {
                dir,
                timeout,
                framed,
                argv,
            } => {
                out.push(RECV.into());
                opt(out, "--dir", dir);
                opt(out, "--timeout", &secs(timeout));
                if *framed {
                    out.push("--framed".into());
                }
                out.push("--".into());
                out.extend(argv.iter().cloned());
            }
            HelperCommand::Start { dir, helper } => {
                out.push(START.into());
                opt(out, "--dir", dir);
                out.push("--".into());
                helper.push_args(out);
            }
            HelperCommand::Clean { tmpdir, min_age } => {
                out.push(CLEAN.into());
                if let Some(t) = tmpdir {
                    opt(out, "--tmpdir", t);
                }
                if let Some(a) = min_age {
                    opt(out, "--min-age", &a.as_secs().to_string());
                }
            }
            HelperCommand::Serve { dir, timeout } => {
                out.push(SERVE.into());
                opt(out, "--dir", dir);
                opt(out, "--timeout", &secs(timeout));
            }
            HelperCommand::Own {
                dir,
                grace,
                info,
                manifest,
            } => {
                out.push(OWN.into());
                opt(out, "--dir", dir);
                if let Some(g) = grace {
                    opt(out, "--grace", &secs(g));
                }
                opt(out, "--info", info);
                if let Some(m) = manifest {
                    opt(out, "--manifest", m);
                }
            }
            HelperCommand::Sessions {
                scope,
                remove_dead,
                cancel,
            } => {
                out.push(SESSIONS.into());
                match scope {
                    Scope::Dir(d) => opt(out, "--dir", d),
                    Scope::Tmpdir { tmpdir, target } => {
                        opt(out, "--tmpdir", tmpdir);
                        if let Some(t) = target {
                            opt(out, "--target", t);
                        }
                    }
                }
                if *remove_dead {
                    out.push("--remove-dead".into());
                }
                if *cancel {
                    out.push("--cancel".into());
                }
            }
            HelperCommand::Manifest { dir, manifest } => {
                out.push(MANIFEST.into());
                opt(out, "--dir", dir);
                opt(out, "--manifest", manifest);
            }
        }
    }

    /// Parses the argv after the program name (the subcommand first).
    /// Anything unexpected is an error, never a panic.
    pub fn parse(args: &[OsString]) -> Result<HelperCommand> {
        let (sub, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("missing helper subcommand"))?;
        let sub = sub
            .to_str()
            .ok_or_else(|| anyhow!("invalid helper subcommand {sub:?}"))?;
        let o = Options::parse(rest)?;
        let cmd = match sub {
            SEND => {
                o.only(
                    &[
                        "--dir",
                        "--chunk-size",
                        "--window",
                        "--timeout",
                        "--compress",
                    ],
                    sub,
                )?;
                HelperCommand::Send {
                    dir: o.dir()?,
                    chunk_size: o.chunk_size()?,
                    window: o.window()?,
                    timeout: o.timeout()?,
                    compress: match o.get("--compress") {
                        Some(spec) => Compress::parse_spec(spec).context("option --compress")?,
                        None => Compress::None,
                    },
                    argv: o.program("zfs send")?,
                }
            }
            RECV => {
                o.only(&["--dir", "--timeout", "--framed"], sub)?;
                HelperCommand::Recv {
                    dir: o.dir()?,
                    timeout: o.timeout()?,
                    framed: o.flag("--framed"),
                    argv: o.program("zfs receive")?,
                }
            }
            START => {
                o.only(&["--dir"], sub)?;
                let dir = o.dir()?;
                let inner: Vec<OsString> = o.argv.iter().map(OsString::from).collect();
                let helper = HelperCommand::parse(&inner)?;
                if !matches!(
                    helper,
                    HelperCommand::Send { .. } | HelperCommand::Recv { .. }
                ) {
                    bail!("{START} starts {SEND} or {RECV}");
                }
                HelperCommand::Start {
                    dir,
                    helper: Box::new(helper),
                }
            }
            CLEAN => {
                o.only(&["--tmpdir", "--min-age"], sub)?;
                o.no_program(sub)?;
                HelperCommand::Clean {
                    tmpdir: o.get("--tmpdir").map(str::to_string),
                    min_age: o.number("--min-age")?.map(Duration::from_secs),
                }
            }
            SERVE => {
                o.only(&["--dir", "--timeout"], sub)?;
                o.no_program(sub)?;
                HelperCommand::Serve {
                    dir: o.dir()?,
                    timeout: o.timeout()?,
                }
            }
            OWN => {
                o.only(&["--dir", "--grace", "--info", "--manifest"], sub)?;
                o.no_program(sub)?;
                let grace = match o.number("--grace")? {
                    Some(0) => bail!("--grace must be at least 1 second"),
                    g => g.map(Duration::from_secs),
                };
                HelperCommand::Own {
                    dir: o.dir()?,
                    grace,
                    info: o.required("--info")?,
                    manifest: o.get("--manifest").map(str::to_string),
                }
            }
            SESSIONS => {
                o.only(
                    &["--dir", "--tmpdir", "--target", "--remove-dead", "--cancel"],
                    sub,
                )?;
                o.no_program(sub)?;
                let scope = match (o.get("--dir"), o.get("--tmpdir")) {
                    (Some(d), None) if o.get("--target").is_none() => Scope::Dir(d.to_string()),
                    (None, Some(t)) => Scope::Tmpdir {
                        tmpdir: t.to_string(),
                        target: o.get("--target").map(str::to_string),
                    },
                    _ => bail!("give either --dir or --tmpdir [--target DS]"),
                };
                HelperCommand::Sessions {
                    scope,
                    remove_dead: o.flag("--remove-dead"),
                    cancel: o.flag("--cancel"),
                }
            }
            MANIFEST => {
                o.only(&["--dir", "--manifest"], sub)?;
                o.no_program(sub)?;
                HelperCommand::Manifest {
                    dir: o.dir()?,
                    manifest: o.required("--manifest")?,
                }
            }
            _ => bail!("unknown helper subcommand {sub}"),
        };
        Ok(cmd)
    }
}

/// Flags that take no value.
const FLAGS: &[&str] = &["--remove-dead", "--cancel", "--framed"];

/// `--key value` options (and flags) up to `--`, then the program's argv.
struct Options {
    values: Vec<(String, String)>,
    flags: Vec<String>,
    /// Everything after `--`; None when there was no `--`.
    argv: Vec<String>,
    dashdash: bool,
}

impl Options {
    fn parse(args: &[OsString]) -> Result<Options> {
        let mut o = Options {
            values: Vec::new(),
            flags: Vec::new(),
            argv: Vec::new(),
            dashdash: false,
        };
        let text = |a: &OsString| -> Result<String> {
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("invalid (non UTF-8) argument {a:?}"))
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let key = text(arg)?;
            if key == "--" {
                o.argv = it.map(text).collect::<Result<_>>()?;
                o.dashdash = true;
                break;
            }
            let seen = o.flags.contains(&key) || o.values.iter().any(|(k, _)| *k == key);
            if seen {
                bail!("option {key} given twice");
            }
            if FLAGS.contains(&key.as_str()) {
                o.flags.push(key);
                continue;
            }
            if !key.starts_with("--") {
                bail!("unexpected argument {key:?}");
            }
            let value = it
                .next()
                .ok_or_else(|| anyhow!("option {key} needs a value"))?;
            let value = text(value).with_context(|| format!("option {key}"))?;
            o.values.push((key, value));
        }
        Ok(o)
    }

    /// Refuses options other than `allowed`.
    fn only(&self, allowed: &[&str], sub: &str) -> Result<()> {
        let keys = self.values.iter().map(|(k, _)| k).chain(&self.flags);
        for k in keys {
            if !allowed.contains(&k.as_str()) {
                bail!("unknown option {k} for {sub}");
            }
        }
        Ok(())
    }

    fn no_program(&self, sub: &str) -> Result<()> {
        if self.dashdash {
            bail!("{sub} takes no command after --");
        }
        Ok(())
    }

    fn program(&self, what: &str) -> Result<Vec<String>> {
        if self.argv.is_empty() {
            bail!("missing the {what} command after --");
        }
        Ok(self.argv.clone())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }

    fn required(&self, key: &str) -> Result<String> {
        self.get(key)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{key} is required"))
    }

    fn number(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| parse_u64(v).with_context(|| format!("option {key}")))
            .transpose()
    }

    fn in_range(&self, key: &str, lo: u64, hi: u64, unit: &str) -> Result<u64> {
        let n = self
            .number(key)?
            .ok_or_else(|| anyhow!("{key} is required"))?;
        if !(lo..=hi).contains(&n) {
            bail!("{key} {n}: must be {lo} to {hi} {unit}");
        }
        Ok(n)
    }

    fn dir(&self) -> Result<String> {
        let dir = self.required("--dir")?;
        super::folder::session_id_of(std::path::Path::new(&dir))?;
        Ok(dir)
    }

    fn chunk_size(&self) -> Result<u64> {
        self.in_range("--chunk-size", 1, CHUNK_SIZE_MAX, "bytes")
    }

    fn window(&self) -> Result<u64> {
        self.in_range("--window", 1, 1_000_000, "chunks")
    }

    fn timeout(&self) -> Result<Duration> {
        self.in_range("--timeout", 1, 30 * 24 * 3600, "seconds")
            .map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/tmp/resync-0123456789abcdef";

    fn round_trip(c: &HelperCommand) {
        let argv = c.to_argv("/usr/bin/resync");
        assert_eq!(argv[0], "/usr/bin/resync");
        let args: Vec<OsString> = argv[1..].iter().map(OsString::from).collect();
        assert_eq!(&HelperCommand::parse(&args).unwrap(), c, "{argv:?}");
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn every_command_round_trips_through_its_argv() {
        let send = HelperCommand::Send {
            dir: DIR.into(),
            chunk_size: 8 << 20,
            window: 4,
            timeout: Duration::from_secs(60),
            compress: Compress::Adaptive,
            // Options after `--` belong to the program.
            argv: vec![
                "zfs".into(),
                "send".into(),
                "--dir".into(),
                "p/x y@s".into(),
            ],
        };
        let recv = HelperCommand::Recv {
            dir: DIR.into(),
            timeout: Duration::from_secs(5),
            framed: true,
            argv: vec!["zfs".into(), "receive".into(), "-s".into(), "p/y".into()],
        };
        let with = |compress| match send.clone() {
            HelperCommand::Send {
                dir,
                chunk_size,
                window,
                timeout,
                argv,
                ..
            } => HelperCommand::Send {
                dir,
                chunk_size,
                window,
                timeout,
                compress,
                argv,
            },
            other => other,
        };
        let plain_send = with(Compress::None);
        let fixed_send = with(Compress::Fixed { level: -1 });
        let plain_recv = HelperCommand::Recv {
            dir: DIR.into(),
            timeout: Duration::from_secs(5),
            framed: false,
            argv: vec!["zfs".into(), "receive".into()],
        };
        for c in [
            plain_send,
            fixed_send,
            plain_recv,
            send.clone(),
            recv.clone(),
            HelperCommand::Start {
                dir: DIR.into(),
                helper: Box::new(send),
            },
            HelperCommand::Start {
                dir: DIR.into(),
                helper: Box::new(recv),
            },
            HelperCommand::Clean {
                tmpdir: None,
                min_age: None,
            },
            HelperCommand::Clean {
                tmpdir: Some("/var/tmp".into()),
                min_age: Some(Duration::from_secs(0)),
            },
            HelperCommand::Serve {
                dir: DIR.into(),
                timeout: Duration::from_secs(30),
            },
            HelperCommand::Own {
                dir: DIR.into(),
                grace: Some(Duration::from_secs(15)),
                info: "session x\nhost a b\n".into(),
                manifest: Some("role receiver\n".into()),
            },
            HelperCommand::Own {
                dir: DIR.into(),
                grace: None,
                info: "i".into(),
                manifest: None,
            },
            HelperCommand::Sessions {
                scope: Scope::Dir(DIR.into()),
                remove_dead: true,
                cancel: true,
            },
            HelperCommand::Sessions {
                scope: Scope::Tmpdir {
                    tmpdir: "/tmp".into(),
                    target: Some("p/x y".into()),
                },
                remove_dead: false,
                cancel: false,
            },
            HelperCommand::Manifest {
                dir: DIR.into(),
                manifest: "role sender\n".into(),
            },
        ] {
            round_trip(&c);
        }
    }

    #[test]
    fn the_argv_is_the_documented_command_line() {
        let c = HelperCommand::Start {
            dir: DIR.into(),
            helper: Box::new(HelperCommand::Recv {
                dir: DIR.into(),
                timeout: Duration::from_secs(7),
                framed: false,
                argv: vec!["zfs".into(), "receive".into(), "p/y".into()],
            }),
        };
        assert_eq!(
            c.to_argv("resync").join(" "),
            format!("resync __chunk-start --dir {DIR} -- __chunk-recv --dir {DIR} --timeout 7 -- zfs receive p/y")
        );
    }

    #[test]
    fn bad_command_lines_are_errors() {
        let d = DIR;
        for bad in [
            &[][..],
            &["__chunk-bogus"],
            &["__chunk-send", "--dir"],
            &[
                "__chunk-send",
                "--dir",
                d,
                "--chunk-size",
                "0",
                "--window",
                "1",
                "--timeout",
                "1",
                "--",
                "zfs",
            ],
            &[
                "__chunk-send",
                "--dir",
                d,
                "--chunk-size",
                "1073741825",
                "--window",
                "1",
                "--timeout",
                "1",
                "--",
                "zfs",
            ],
            &[
                "__chunk-send",
                "--dir",
                d,
                "--chunk-size",
                "1",
                "--window",
                "0",
                "--timeout",
                "1",
                "--",
                "zfs",
            ],
            &[
                "__chunk-send",
                "--dir",
                d,
                "--chunk-size",
                "1",
                "--window",
                "1",
                "--timeout",
                "-1",
                "--",
                "zfs",
            ],
            &[
                "__chunk-send",
                "--dir",
                d,
                "--chunk-size",
                "1",
                "--window",
                "1",
                "--timeout",
                "1",
            ],
            &[
                "__chunk-recv",
                "--dir",
                d,
                "--dir",
                d,
                "--timeout",
                "1",
                "--",
                "zfs",
            ],
            &[
                "__chunk-recv",
                "--dir",
                "/tmp/x",
                "--timeout",
                "1",
                "--",
                "zfs",
            ],
            &[
                "__chunk-recv",
                "--dir",
                d,
                "--timeout",
                "1",
                "--window",
                "2",
                "--",
                "zfs",
            ],
            &["__chunk-recv", "zfs"],
            &[
                "__chunk-start",
                "--dir",
                d,
                "--",
                "__chunk-serve",
                "--dir",
                d,
                "--timeout",
                "1",
            ],
            &["__chunk-serve", "--dir", d, "--timeout", "1", "--", "x"],
            &["__chunk-own", "--dir", d, "--info", "i", "--grace", "0"],
            &["__chunk-own", "--dir", d, "--info", "i", "--grace", "x"],
            &["__chunk-own", "--dir", d],
            &["__chunk-sessions", "--dir", d, "--tmpdir", "/tmp"],
            &["__chunk-sessions", "--dir", d, "--target", "p/x"],
            &["__chunk-sessions", "--remove-dead"],
            &["__chunk-manifest", "--dir", d],
        ] {
            assert!(HelperCommand::parse(&os(bad)).is_err(), "{bad:?}");
        }
        use std::os::unix::ffi::OsStringExt;
        let non_utf8 = vec![
            OsString::from("__chunk-serve"),
            OsString::from("--dir"),
            OsString::from_vec(vec![0xff, 0xfe]),
        ];
        assert!(HelperCommand::parse(&non_utf8).is_err());
    }
}
