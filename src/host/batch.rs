//! Several commands in one remote exec: starting a command over SSH costs a
//! round trip and an sshd session (~95 ms on the test bed), so small
//! commands that need no stdout (`zfs destroy`, `zfs snapshot`, `zfs
//! hold`) go to a host as one `sh -c` script of argv-quoted commands, each
//! followed by a marker line with its exit status. [`script_argv`] builds
//! it and [`parse_output`] splits the output back into one [`CmdOutput`]
//! per command (its stdout and stderr together, as `stderr`). Runs nothing.

use anyhow::{bail, Result};

use super::quote::sh_join;
use super::CmdOutput;

/// What precedes each status line (an ASCII record separator: no command
/// we batch prints one).
const MARK: &str = "\u{1e}resync-status ";

/// `sh -c 'CMD1 </dev/null 2>&1; printf ... $?; CMD2 ...'`.
pub fn script_argv(commands: &[Vec<String>]) -> Vec<String> {
    let script: String = commands
        .iter()
        .map(|argv| {
            format!(
                "{} </dev/null 2>&1; printf '\\n\\036resync-status %d\\n' $?\n",
                sh_join(argv)
            )
        })
        .collect();
    vec!["sh".into(), "-c".into(), script]
}

/// The output of [`script_argv`] with `count` commands, one entry each. A
/// script that stopped early (fewer status lines) is an error.
pub fn parse_output(count: usize, stdout: &str) -> Result<Vec<CmdOutput>> {
    let mut outputs = Vec::with_capacity(count);
    let mut rest = stdout;
    while let Some(at) = rest.find(MARK) {
        let text = rest[..at].strip_suffix('\n').unwrap_or(&rest[..at]);
        let after = &rest[at + MARK.len()..];
        let (status, tail) = after.split_once('\n').unwrap_or((after, ""));
        let Ok(status) = status.trim().parse::<i32>() else {
            bail!("batched commands: unreadable status line {status:?}");
        };
        outputs.push(CmdOutput {
            status,
            stdout: String::new(),
            stderr: text.to_string(),
        });
        rest = tail;
    }
    if outputs.len() != count {
        bail!(
            "batched commands: {} of {count} reported their status",
            outputs.len()
        );
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Host, LocalHost};

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn each_command_gets_its_own_status_and_output() {
        let cmds = vec![
            argv(&["true"]),
            argv(&["sh", "-c", "echo 'it is; not here' >&2; exit 3"]),
            argv(&["printf", "%s", "no newline"]),
            argv(&["echo", "a b'c"]),
        ];
        let out = LocalHost::new().run(&script_argv(&cmds)).expect("runs");
        let outs = parse_output(cmds.len(), &out.stdout).expect("parses");
        let got: Vec<(i32, &str)> = outs.iter().map(|o| (o.status, o.stderr.as_str())).collect();
        assert_eq!(
            got,
            [
                (0, ""),
                (3, "it is; not here\n"),
                (0, "no newline"),
                (0, "a b'c\n")
            ]
        );
    }

    #[test]
    fn a_script_that_stopped_early_is_an_error() {
        let out = "\n\u{1e}resync-status 0\n";
        assert!(parse_output(2, out).is_err());
        assert_eq!(parse_output(1, out).expect("one").len(), 1);
    }
}
