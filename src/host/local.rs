//! This machine as a [`Host`]: argv goes straight to `std::process::Command`
//! (never through a shell). Stderr is drained on its own thread so a child can
//! never block on a full pipe, and a missing program is a one-line error.

use super::{push_capped, signal_status, Child, CmdOutput, ExitInfo, Host};
use anyhow::{bail, Context};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

/// Runs commands on this machine.
#[derive(Debug, Default, Clone)]
pub struct LocalHost;

impl LocalHost {
    pub fn new() -> LocalHost {
        LocalHost
    }
}

impl Host for LocalHost {
    fn label(&self) -> &str {
        "local"
    }

    fn run(&self, argv: &[String]) -> anyhow::Result<CmdOutput> {
        self.run_for(self.label(), argv)
    }

    fn spawn(&self, argv: &[String]) -> anyhow::Result<Box<dyn Child>> {
        self.spawn_for(self.label(), argv)
    }
}

impl LocalHost {
    /// Runs `argv` here on behalf of the host `label` (a local `ssh` that
    /// runs a command there counts as that host's command).
    pub(crate) fn run_for(&self, label: &str, argv: &[String]) -> anyhow::Result<CmdOutput> {
        super::count_started(label);
        let output = command(argv)?
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {} on local host", argv[0]))?;
        Ok(CmdOutput {
            status: exit_code(output.status),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Starts `argv` here on behalf of the host `label` (see [`run_for`]).
    ///
    /// [`run_for`]: LocalHost::run_for
    pub(crate) fn spawn_for(&self, label: &str, argv: &[String]) -> anyhow::Result<Box<dyn Child>> {
        super::count_started(label);
        let mut child = command(argv)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} on local host", argv[0]))?;
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut collected = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => push_capped(&mut collected, &buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                collected
            })
        });
        Ok(Box::new(LocalChild {
            program: argv[0].clone(),
            child,
            stderr,
        }))
    }
}

/// A command built from argv, after checking that its program exists.
fn command(argv: &[String]) -> anyhow::Result<Command> {
    let Some(program) = argv.first() else {
        bail!("empty command line for local host");
    };
    if !program.contains('/') && which::which(program).is_err() {
        bail!("{program} not found in PATH on local host");
    }
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..]);
    Ok(cmd)
}

fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => signal_status(signal),
        (None, None) => -1,
    }
}

struct LocalChild {
    program: String,
    child: std::process::Child,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Child for LocalChild {
    fn take_stdout(&mut self) -> Option<Box<dyn Read + Send>> {
        self.child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>)
    }

    fn take_stdin(&mut self) -> Option<Box<dyn std::io::Write + Send>> {
        self.child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Write + Send>)
    }

    fn wait(mut self: Box<Self>) -> anyhow::Result<ExitInfo> {
        drop(self.child.stdin.take());
        // Read an untaken stdout to the end so the child cannot block on it.
        let discard = self.child.stdout.take().map(|mut out| {
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()))
        });
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for {} on local host", self.program))?;
        if let Some(discard) = discard {
            let _ = discard.join();
        }
        let stderr = match self.stderr.take() {
            Some(handle) => handle.join().unwrap_or_default(),
            None => Vec::new(),
        };
        Ok(ExitInfo {
            status: exit_code(status),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_captures_stdout_stderr_and_status() {
        let out = LocalHost
            .run(&argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
            .unwrap();
        assert_eq!(out.status, 3);
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn run_passes_arguments_without_a_shell() {
        let out = LocalHost
            .run(&argv(&["printf", "%s|", "a b", "$(x)", ""]))
            .unwrap();
        assert_eq!(out.stdout, "a b|$(x)||");
    }

    #[test]
    fn missing_program_is_a_one_line_error() {
        let err = LocalHost
            .run(&argv(&["resync-no-such-program", "x"]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "resync-no-such-program not found in PATH on local host"
        );
        assert!(LocalHost.spawn(&argv(&["resync-no-such-program"])).is_err());
    }

    #[test]
    fn signal_death_is_128_plus_signal() {
        let out = LocalHost.run(&argv(&["sh", "-c", "kill -9 $$"])).unwrap();
        assert_eq!(out.status, 137);
    }

    #[test]
    fn spawn_streams_stdin_to_stdout_across_threads() {
        let mut child = LocalHost
            .spawn(&argv(&["sh", "-c", "wc -c; echo done >&2"]))
            .unwrap();
        let mut stdin = child.take_stdin().unwrap();
        let mut stdout = child.take_stdout().unwrap();
        let writer = std::thread::spawn(move || {
            let block = vec![7u8; 1 << 20];
            for _ in 0..8 {
                stdin.write_all(&block).unwrap();
            }
        });
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        writer.join().unwrap();
        let exit = child.wait().unwrap();
        assert_eq!(text.trim(), (8 << 20).to_string());
        assert_eq!(exit.status, 0);
        assert_eq!(exit.stderr, "done\n");
    }

    #[test]
    fn lots_of_stderr_cannot_deadlock() {
        let mut child = LocalHost
            .spawn(&argv(&[
                "sh",
                "-c",
                "head -c 3000000 /dev/zero >&2; echo ok",
            ]))
            .unwrap();
        let mut text = String::new();
        child
            .take_stdout()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let exit = child.wait().unwrap();
        assert_eq!(text, "ok\n");
        assert_eq!(exit.stderr.len(), super::super::STDERR_CAP);
    }

    #[test]
    fn untaken_stdout_is_discarded_and_wait_returns() {
        let child = LocalHost
            .spawn(&argv(&["sh", "-c", "head -c 5000000 /dev/zero; exit 4"]))
            .unwrap();
        assert_eq!(child.wait().unwrap().status, 4);
    }

    #[test]
    fn kill_ends_a_running_child() {
        let mut child = LocalHost.spawn(&argv(&["sleep", "30"])).unwrap();
        child.kill();
        assert_eq!(child.wait().unwrap().status, 137);
    }
}
