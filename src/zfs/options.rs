//! `--sendoptions` and `--recvoptions`: syncoid's letter syntax (`"Lc e"`,
//! `"u o compression=lz4"`) parsed into `zfs send`/`zfs receive` flags.
//! Only flags that leave resync's own arguments intact pass; the rest are
//! refused with the reason, in one line.

use anyhow::{anyhow, bail, Result};

/// `zfs send` flags a user may add, with what they do.
const SEND_FLAGS: &[(char, &str)] = &[
    ('L', "large blocks"),
    ('c', "compressed"),
    ('e', "embedded data"),
    ('w', "raw"),
    ('p', "properties"),
    ('D', "dedup"),
    ('h', "holds"),
    ('b', "backup (received properties)"),
];

/// `zfs send` flags we refuse, and why.
const SEND_REFUSED: &[(char, &str)] = &[
    (
        'R',
        "resync replicates datasets one by one; use its recursive option",
    ),
    ('I', "resync chooses incremental sources itself"),
    ('i', "resync chooses incremental sources itself"),
    ('t', "resync resumes interrupted transfers itself"),
    ('n', "a dry-run send sends nothing"),
    ('v', "it writes to the stream's terminal channel"),
    ('P', "it writes to the stream's terminal channel"),
];

/// `zfs receive` flags a user may add (`o` and `x` take an argument).
const RECV_FLAGS: &[char] = &['u', 'h', 'M', 'v', 'o', 'x'];

/// `zfs receive` flags we refuse, and why.
const RECV_REFUSED: &[(char, &str)] = &[
    (
        'F',
        "resync decides when to force a receive (see --force-delete)",
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

/// Splits syncoid's option syntax: whitespace-separated groups of letters,
/// each optionally led by one `-`. Returns `(letter, argument)` pairs, where
/// a letter in `takes_arg` must end its group and takes the next group.
fn split_letter_options(s: &str, takes_arg: &[char]) -> Result<Vec<(char, Option<String>)>> {
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
            if takes_arg.contains(&c) {
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

/// Parses `--sendoptions` in syncoid's syntax: `"Lc e"` -> `["-L", "-c",
/// "-e"]`. Only flags that leave resync's own send arguments intact are
/// accepted; anything else is a one-line error.
pub fn parse_send_options(s: &str) -> Result<Vec<String>> {
    let parse = || -> Result<Vec<String>> {
        split_letter_options(s, &[])?
            .into_iter()
            .map(|(c, _)| {
                if SEND_FLAGS.iter().any(|&(f, _)| f == c) {
                    Ok(format!("-{c}"))
                } else if let Some((_, why)) = SEND_REFUSED.iter().find(|&&(f, _)| f == c) {
                    Err(anyhow!("-{c} is not allowed: {why}"))
                } else {
                    let known: String = SEND_FLAGS.iter().map(|&(f, _)| f).collect();
                    Err(anyhow!(
                        "-{c} is not a send option resync passes on (allowed: {known})"
                    ))
                }
            })
            .collect()
    };
    parse().map_err(|e| anyhow!("invalid send options {s:?}: {e}"))
}

/// Parses `--recvoptions` in syncoid's syntax: `"u o compression=lz4 x
/// mountpoint"` -> `["-u", "-o", "compression=lz4", "-x", "mountpoint"]`.
/// `o` takes `property=value`, `x` takes `property`.
pub fn parse_recv_options(s: &str) -> Result<Vec<String>> {
    let parse = || -> Result<Vec<String>> {
        let mut argv = Vec::new();
        for (c, arg) in split_letter_options(s, &['o', 'x'])? {
            if let Some((_, why)) = RECV_REFUSED.iter().find(|&&(f, _)| f == c) {
                bail!("-{c} is not allowed: {why}");
            }
            if !RECV_FLAGS.contains(&c) {
                let known: String = RECV_FLAGS.iter().collect();
                bail!("-{c} is not a receive option resync passes on (allowed: {known})");
            }
            argv.push(format!("-{c}"));
            if let Some(arg) = arg {
                check_property_arg(c, &arg)?;
                argv.push(arg);
            }
        }
        Ok(argv)
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

    #[test]
    fn send_options_use_syncoid_syntax() {
        assert_eq!(
            parse_send_options("Lc e").unwrap(),
            strings(&["-L", "-c", "-e"])
        );
        assert_eq!(parse_send_options(" w ").unwrap(), strings(&["-w"]));
        assert_eq!(
            parse_send_options("-Lc -p").unwrap(),
            strings(&["-L", "-c", "-p"])
        );
        assert_eq!(
            parse_send_options("D h b").unwrap(),
            strings(&["-D", "-h", "-b"])
        );
        assert_eq!(parse_send_options("").unwrap(), Vec::<String>::new());
        for (input, want) in [
            ("R", "-R is not allowed"),
            ("LI", "-I is not allowed"),
            ("i", "-i is not allowed"),
            ("t", "-t is not allowed"),
            ("nv", "-n is not allowed"),
            ("P", "-P is not allowed"),
            ("q", "-q is not a send option"),
            ("L;", "';' is not an option letter"),
            ("--raw", "give single letters"),
            ("-", "give single letters"),
        ] {
            let got = err(parse_send_options(input));
            assert!(
                got.starts_with(&format!("invalid send options {input:?}: ")),
                "{got}"
            );
            assert!(got.contains(want), "{input:?}: {got}");
            assert!(!got.contains('\n'), "{got}");
        }
    }

    #[test]
    fn recv_options_use_syncoid_syntax() {
        assert_eq!(
            parse_recv_options("u o compression=lz4 x mountpoint").unwrap(),
            strings(&["-u", "-o", "compression=lz4", "-x", "mountpoint"])
        );
        assert_eq!(
            parse_recv_options("uo com.example:tag=a,b x org:prop").unwrap(),
            strings(&["-u", "-o", "com.example:tag=a,b", "-x", "org:prop"])
        );
        assert_eq!(
            parse_recv_options("h M v").unwrap(),
            strings(&["-h", "-M", "-v"])
        );
        for (input, want) in [
            ("F", "-F is not allowed"),
            ("us", "-s is not allowed"),
            ("A", "-A is not allowed"),
            ("n", "-n is not allowed"),
            ("d", "-d is not allowed"),
            ("z", "-z is not a receive option"),
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
