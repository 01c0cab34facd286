//! `resync generate man|bash|zsh|fish`: the man page and the shell
//! completions, made from the clap definitions in `cli.rs` (clap_mangen,
//! clap_complete), so they never drift from `--help`. Written to stdout;
//! INSTALL.md says where each goes. `main` dispatches here before parsing
//! the replication command line, as it does for the chunk helpers.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// The first argument that selects this mode.
pub const SUBCOMMAND: &str = "generate";

const USAGE: &str = "usage: resync generate man|bash|zsh|fish";

/// `resync generate WHAT` (the arguments after `generate`): 0, or 2 with
/// one line on stderr.
pub fn main(args: &[std::ffi::OsString]) -> i32 {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let stdout = std::io::stdout();
    match generate(&args, &mut stdout.lock()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("resync: error: {e:#}");
            2
        }
    }
}

fn generate(args: &[String], out: &mut dyn Write) -> Result<()> {
    let [what] = args else {
        bail!("{USAGE}");
    };
    let mut cmd = Cli::command();
    let shell = match what.as_str() {
        "man" => {
            return clap_mangen::Man::new(cmd)
                .render(out)
                .context("writing the man page");
        }
        "bash" => Shell::Bash,
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        other => bail!("cannot generate {other:?}; {USAGE}"),
    };
    clap_complete::generate(shell, &mut cmd, "resync", out);
    out.flush().context("writing the completions")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(what: &str) -> String {
        let mut out = Vec::new();
        generate(&[what.to_string()], &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_man_page_documents_every_flag() {
        let man = text("man");
        assert!(
            man.starts_with(".ie") || man.contains(".TH resync 1"),
            "{man}"
        );
        for flag in [
            "sendoptions",
            "include\\-snaps",
            "delete\\-target\\-snapshots",
            "json",
        ] {
            assert!(man.contains(flag), "{flag} in the man page");
        }
    }

    #[test]
    fn completions_are_valid_scripts_that_know_the_flags() {
        for shell in ["bash", "zsh", "fish"] {
            let script = text(shell);
            assert!(script.contains("include-snaps"), "{shell}");
            assert!(script.contains("sshoption"), "{shell}");
        }
        // bash can at least parse its own.
        let bash = text("bash");
        let status = std::process::Command::new("bash")
            .args(["-n", "-c", &bash])
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn anything_else_is_one_line_of_usage() {
        for args in [
            vec![],
            vec!["pdf".to_string()],
            vec!["man".into(), "x".into()],
        ] {
            let e = format!("{:#}", generate(&args, &mut Vec::new()).unwrap_err());
            assert!(e.contains(USAGE), "{e}");
            assert!(!e.contains('\n'));
        }
    }
}
