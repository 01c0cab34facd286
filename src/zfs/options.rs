//! `--sendoptions` and `--recvoptions`: syncoid's letter syntax (`"Lc e"`,
//! `"u o compression=lz4"`) parsed into `zfs send`/`zfs receive` flags.
//! What syncoid accepts is accepted; as syncoid does, flags a step cannot
//! use are left out (progress output, flags that only go with `-R`,
//! receive flags resync decides itself), and resync says which and why.
//! `-R` is left out too (resync replicates dataset by dataset; `-r` is how
//! children come along), and refused together with `-r`, as syncoid does.

use anyhow::{anyhow, bail, Result};

/// Options parsed from `--sendoptions` or `--recvoptions`: the flags passed
/// on, and one line per flag left out, saying why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOptions {
    pub argv: Vec<String>,
    pub dropped: Vec<String>,
}

/// `zfs send` flags passed on.
const SEND_FLAGS: &[char] = &['L', 'c', 'e', 'w', 'p', 'D', 'h', 'b'];

/// `zfs send` flags left out, and why.
const SEND_DROPPED: &[(char, &str)] = &[
    (
        'R',
        "resync sends dataset by dataset; add -r/--recursive to replicate the children",
    ),
    ('P', "resync shows its own progress"),
    ('v', "resync shows its own progress"),
    ('V', "resync shows its own progress"),
    ('n', "a dry-run send sends nothing (use resync --dry-run)"),
    ('s', "it only goes with -R"),
    ('X', "it only goes with -R"),
    ('I', "resync chooses incremental sources itself"),
    ('i', "resync chooses incremental sources itself"),
    ('t', "resync resumes interrupted transfers itself"),
];

/// `zfs receive` flags passed on (`o` and `x` take an argument).
const RECV_FLAGS: &[char] = &['u', 'h', 'M', 'v', 'o', 'x'];

/// `zfs receive` flags left out, and why.
const RECV_DROPPED: &[(char, &str)] = &[
    (
        'F',
        "resync decides when to force a receive (see --force-delete, --no-rollback)",
    ),
    ('s', "resync decides when a receive is resumable"),
    ('A', "resync aborts partial receives itself"),
    (
        'n',
        "a dry-run receive would make a failed run look complete",
    ),
    (
        'd',
        "it changes where the stream lands; name the target instead",
    ),
    (
        'e',
        "it changes where the stream lands; name the target instead",
    ),
    ('c', "corrective receive is not replication"),
];

/// Letters that take the next word as their argument in syncoid's parser.
const TAKES_ARG: &[char] = &['o', 'x', 'X'];

/// Splits syncoid's option syntax: whitespace-separated groups of letters,
/// each optionally led by one `-`. Returns `(letter, argument)` pairs: `o`,
/// `x` and `X` must end their group and take the next group.
fn split_letter_options(s: &str) -> Result<Vec<(char, Option<String>)>> {
    let mut out = Vec::new();
    let mut tokens = s.split_whitespace();
    while let Some(token) = tokens.next() {
        let letters = token.strip_prefix('-').unwrap_or(token);
        if letters.is_empty() || letters.starts_with('-') {
            bail!("option {token:?}: give single letters, e.g. \"Lc e\"");
        }
        let mut chars = letters.chars().peekable();
        while let Some(c) = chars.next() {
            if !c.is_ascii_alphabetic() {
                bail!("option {token:?}: {c:?} is not an option letter");
            }
            if TAKES_ARG.contains(&c) {
                if chars.peek().is_some() {
                    bail!("option {token:?}: -{c} takes an argument, so it must end its group");
                }
                let arg = tokens
                    .next()
                    .ok_or_else(|| anyhow!("option -{c} needs an argument after it"))?;
                out.push((c, Some(arg.to_string())));
            } else {
                out.push((c, None));
            }
        }
    }
    Ok(out)
}

fn dropped_line(which: &str, c: char, arg: Option<&str>, why: &str) -> String {
    let shown = match arg {
        Some(a) => format!("-{c} {a}"),
        None => format!("-{c}"),
    };
    format!("{which}: leaving out {shown}: {why}")
}

/// Parses `--sendoptions` in syncoid's syntax: `"Lc e"` -> `["-L", "-c",
/// "-e"]`. Flags resync cannot pass on are left out (see [`ParsedOptions`]);
/// `-R` with `recursive` is refused, as syncoid refuses it.
pub fn parse_send_options(s: &str, recursive: bool) -> Result<ParsedOptions> {
    let parse = || -> Result<ParsedOptions> {
        let mut out = ParsedOptions::default();
        for (c, arg) in split_letter_options(s)? {
            if c == 'R' && recursive {
                bail!("zfs send -R and --recursive aren't compatible (as in syncoid)");
            }
            if SEND_FLAGS.contains(&c) {
                out.argv.push(format!("-{c}"));
                continue;
            }
            let why = SEND_DROPPED.iter().find(|&&(f, _)| f == c).map_or(
                "not a zfs send flag syncoid or resync passes on",
                |&(_, w)| w,
            );
            out.dropped
                .push(dropped_line("--sendoptions", c, arg.as_deref(), why));
        }
        Ok(out)
    };
    parse().map_err(|e| anyhow!("invalid send options {s:?}: {e}"))
}

/// Parses `--recvoptions` in syncoid's syntax: `"u o compression=lz4 x
/// mountpoint"` -> `["-u", "-o", "compression=lz4", "-x", "mountpoint"]`.
/// `o` takes `property=value`, `x` takes `property`. Flags resync decides
/// itself are left out (see [`ParsedOptions`]).
pub fn parse_recv_options(s: &str) -> Result<ParsedOptions> {
    let parse = || -> Result<ParsedOptions> {
        let mut out = ParsedOptions::default();
        for (c, arg) in split_letter_options(s)? {
            if !RECV_FLAGS.contains(&c) {
                let why = RECV_DROPPED.iter().find(|&&(f, _)| f == c).map_or(
                    "not a zfs receive flag syncoid or resync passes on",
                    |&(_, w)| w,
                );
                out.dropped
                    .push(dropped_line("--recvoptions", c, arg.as_deref(), why));
                continue;
            }
            out.argv.push(format!("-{c}"));
            if let Some(arg) = arg {
                check_property_arg(c, &arg)?;
                out.argv.push(arg);
            }
        }
        Ok(out)
    };
    parse().map_err(|e| anyhow!("invalid receive options {s:?}: {e}"))
}

/// `-o property=value` / `-x property`: a property name of lowercase
/// letters, digits and `_:.-` (native and user properties), starting with a
/// letter or digit; a non-empty value without control characters.
fn check_property_arg(flag: char, arg: &str) -> Result<()> {
    let (name, value) = match (flag, arg.split_once('=')) {
        ('o', Some((name, value))) => (name, Some(value)),
        ('o', None) => bail!("-o {arg:?}: want property=value"),
        (_, Some(_)) => bail!("-{flag} {arg:?}: want a property name without a value"),
        (_, None) => (arg, None),
    };
    let name_ok = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_:.-".contains(c));
    if !name_ok {
        bail!("-{flag} {arg:?}: {name:?} is not a property name");
    }
    if let Some(value) = value {
        if value.is_empty() || value.chars().any(char::is_control) {
            bail!("-{flag} {arg:?}: the value must be non-empty text");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    fn argv(r: Result<ParsedOptions>) -> Vec<String> {
        r.unwrap().argv
    }

    #[test]
    fn send_options_use_syncoid_syntax() {
        assert_eq!(
            argv(parse_send_options("Lc e", false)),
            strings(&["-L", "-c", "-e"])
        );
        assert_eq!(argv(parse_send_options(" w ", false)), strings(&["-w"]));
        assert_eq!(
            argv(parse_send_options("-Lc -p", false)),
            strings(&["-L", "-c", "-p"])
        );
        assert_eq!(
            argv(parse_send_options("D h b", false)),
            strings(&["-D", "-h", "-b"])
        );
        assert_eq!(
            parse_send_options("", false).unwrap(),
            ParsedOptions::default()
        );
        for (input, want) in [
            ("L;", "';' is not an option letter"),
            ("--raw", "give single letters"),
            ("-", "give single letters"),
            ("X", "-X needs an argument"),
        ] {
            let got = err(parse_send_options(input, false));
            assert!(
                got.starts_with(&format!("invalid send options {input:?}: ")),
                "{got}"
            );
            assert!(got.contains(want), "{input:?}: {got}");
            assert!(!got.contains('\n'), "{got}");
        }
    }

    #[test]
    fn send_flags_a_step_cannot_use_are_left_out_and_said() {
        // -R: left out and said without -r, refused with it (syncoid).
        let o = parse_send_options("Rw", false).unwrap();
        assert_eq!(o.argv, strings(&["-w"]));
        assert_eq!(
            o.dropped,
            strings(&[
                "--sendoptions: leaving out -R: resync sends dataset by dataset; \
                       add -r/--recursive to replicate the children"
            ])
        );
        let e = err(parse_send_options("Rw", true));
        assert!(e.contains("-R and --recursive aren't compatible"), "{e}");
        let o = parse_send_options("wPv LI s X pool/x q", false).unwrap();
        assert_eq!(o.argv, strings(&["-w", "-L"]));
        assert_eq!(
            o.dropped,
            strings(&[
                "--sendoptions: leaving out -P: resync shows its own progress",
                "--sendoptions: leaving out -v: resync shows its own progress",
                "--sendoptions: leaving out -I: resync chooses incremental sources itself",
                "--sendoptions: leaving out -s: it only goes with -R",
                "--sendoptions: leaving out -X pool/x: it only goes with -R",
                "--sendoptions: leaving out -q: not a zfs send flag syncoid or resync passes on",
            ])
        );
    }

    #[test]
    fn recv_options_use_syncoid_syntax() {
        assert_eq!(
            argv(parse_recv_options("u o compression=lz4 x mountpoint")),
            strings(&["-u", "-o", "compression=lz4", "-x", "mountpoint"])
        );
        assert_eq!(
            argv(parse_recv_options("uo com.example:tag=a,b x org:prop")),
            strings(&["-u", "-o", "com.example:tag=a,b", "-x", "org:prop"])
        );
        // syncoid's --help example.
        assert_eq!(
            argv(parse_recv_options("ux recordsize o compression=lz4")),
            strings(&["-u", "-x", "recordsize", "-o", "compression=lz4"])
        );
        assert_eq!(
            argv(parse_recv_options("h M v")),
            strings(&["-h", "-M", "-v"])
        );
        let o = parse_recv_options("Fus").unwrap();
        assert_eq!(o.argv, strings(&["-u"]));
        assert_eq!(o.dropped.len(), 2);
        assert!(o.dropped[0].starts_with("--recvoptions: leaving out -F: resync decides"));
        assert!(o.dropped[1].contains("-s: resync decides when a receive is resumable"));
        for (input, want) in [
            ("o", "-o needs an argument"),
            ("ou compression=lz4", "must end its group"),
            ("o compression", "want property=value"),
            ("o compression=", "value must be non-empty"),
            ("o -F=1", "is not a property name"),
            ("o Compression=lz4", "is not a property name"),
            ("x mountpoint=/x", "without a value"),
            ("x -F", "is not a property name"),
        ] {
            let got = err(parse_recv_options(input));
            assert!(
                got.starts_with(&format!("invalid receive options {input:?}: ")),
                "{got}"
            );
            assert!(got.contains(want), "{input:?}: {got}");
        }
    }
}
