//! POSIX `sh` quoting. A remote command travels as one string that the remote
//! login shell parses again, so every argv element is quoted here: plain safe
//! words stay readable, everything else goes in single quotes.

/// Quote one argument for POSIX `sh`. Words made only of
/// `[A-Za-z0-9_@%+=:,./-]` are returned as they are; anything else (including
/// the empty string) is wrapped in single quotes, with each `'` written as
/// `'\''`.
pub fn sh_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        return arg.to_string();
    }
    let mut quoted = String::with_capacity(arg.len() + 2);
    quoted.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// Quote every element of `argv` and join them with single spaces.
pub fn sh_join(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| sh_quote(arg))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn safe_words_stay_unquoted() {
        assert_eq!(sh_quote("pool/ds@snap-1"), "pool/ds@snap-1");
        assert_eq!(sh_quote("-o"), "-o");
        assert_eq!(sh_quote("a=b,c:d+e%f"), "a=b,c:d+e%f");
    }

    #[test]
    fn everything_else_is_single_quoted() {
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(sh_quote("~"), "'~'");
        assert_eq!(sh_quote("*"), "'*'");
    }

    #[test]
    fn join_separates_with_spaces() {
        let argv = vec!["zfs".to_string(), "list".to_string(), "a b".to_string()];
        assert_eq!(sh_join(&argv), "zfs list 'a b'");
    }

    #[test]
    fn quoted_words_round_trip_through_sh() {
        let argv: Vec<String> = [
            "plain",
            "",
            "two words",
            "it's",
            "\"double\"",
            "$(touch /tmp/resync-quote-pwned)",
            "`id`",
            "back\\slash",
            "new\nline",
            "tab\there",
            "*",
            "~root",
            "a;b|c&d>e<f",
            "ünïcødé",
            "'",
            "''",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let script = format!(
            "for a in {}; do printf '%s\\0' \"$a\"; done",
            sh_join(&argv)
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success());
        let got: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(|s| s.to_string())
            .collect();
        assert_eq!(got, argv);
        assert!(!std::path::Path::new("/tmp/resync-quote-pwned").exists());
    }
}
