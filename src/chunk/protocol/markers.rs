//! The marker files of a session folder (`end`, `error`, `abort`,
//! `progress`, `resend`, `result`, and each chunk's `.md5`): how a process
//! ended, and each marker's `key value` lines and body, rendered and parsed.
//! Parsers take hostile input (a marker is a file another process wrote):
//! unknown, duplicate or missing keys, junk numbers or a body where none
//! belongs are errors, never panics.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use anyhow::{anyhow, bail, Context, Result};

use super::folder::chunk_name;
use super::STDERR_MAX;
use crate::sys::hex;

/// How a process ended, as markers record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
    /// The helper failed on its own (zfs did not start, a write failed).
    Helper,
}

impl Status {
    pub fn from_exit(s: ExitStatus) -> Status {
        match (s.code(), s.signal()) {
            (Some(c), _) => Status::Exited(c),
            (None, Some(sig)) => Status::Signaled(sig),
            (None, None) => Status::Helper,
        }
    }

    pub fn success(self) -> bool {
        self == Status::Exited(0)
    }

    pub fn render(self) -> String {
        match self {
            Status::Exited(c) => format!("exit {c}"),
            Status::Signaled(s) => format!("signal {s}"),
            Status::Helper => "helper".to_string(),
        }
    }

    pub fn parse(s: &str) -> Result<Status> {
        let mut it = s.split(' ');
        let status = match (it.next(), it.next(), it.next()) {
            (Some("exit"), Some(n), None) => Status::Exited(parse_i32(n)?),
            (Some("signal"), Some(n), None) => Status::Signaled(parse_i32(n)?),
            (Some("helper"), None, None) => Status::Helper,
            _ => bail!("invalid status {s:?}"),
        };
        Ok(status)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Exited(c) => write!(f, "exit status {c}"),
            Status::Signaled(s) => write!(f, "killed by signal {s}"),
            Status::Helper => write!(f, "helper failure"),
        }
    }
}

pub fn parse_u64(s: &str) -> Result<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        bail!("invalid number {s:?}");
    }
    s.parse().map_err(|_| anyhow!("number out of range {s:?}"))
}

fn parse_i32(s: &str) -> Result<i32> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!("invalid number {s:?}");
    }
    s.parse().map_err(|_| anyhow!("number out of range {s:?}"))
}

/// Splits a marker into its `key value` fields (exactly the `keys`, each
/// once) and its body (text after the first blank line; None if there is
/// none). `body` says whether a body is allowed.
pub fn parse_fields<'a>(
    text: &'a str,
    keys: &[&str],
    body: bool,
) -> Result<(Vec<&'a str>, Option<&'a str>)> {
    let (head, rest) = match text.split_once("\n\n") {
        Some((h, r)) => (h, Some(r)),
        None => (text.strip_suffix('\n').unwrap_or(text), None),
    };
    if rest.is_some() && !body {
        bail!("unexpected text after the fields");
    }
    let mut values: Vec<Option<&str>> = vec![None; keys.len()];
    for line in head.split('\n') {
        let (k, v) = line
            .split_once(' ')
            .ok_or_else(|| anyhow!("malformed line {line:?}"))?;
        let i = keys
            .iter()
            .position(|key| *key == k)
            .ok_or_else(|| anyhow!("unknown field {k:?}"))?;
        if values[i].replace(v).is_some() {
            bail!("field {k:?} given twice");
        }
    }
    let mut out = Vec::with_capacity(keys.len());
    for (k, v) in keys.iter().zip(values) {
        out.push(v.ok_or_else(|| anyhow!("field {k:?} missing"))?);
    }
    Ok((out, rest))
}

/// The `.md5` file of chunk `index`: its digest. The name in the file must
/// be that chunk's.
pub fn parse_md5(text: &str, index: u64) -> Result<[u8; 16]> {
    let line = text
        .strip_suffix('\n')
        .ok_or_else(|| anyhow!("md5 file of chunk {index} does not end in a newline"))?;
    let (hex, name) = line
        .split_once("  ")
        .ok_or_else(|| anyhow!("md5 file of chunk {index} is not `DIGEST  NAME`"))?;
    if name != chunk_name(index) {
        bail!("md5 file of chunk {index} names {name:?}");
    }
    parse_hex_digest(hex).with_context(|| format!("md5 file of chunk {index}"))
}

pub fn render_md5(index: u64, digest: &[u8; 16]) -> String {
    format!("{}  {}\n", hex(digest), chunk_name(index))
}

fn parse_hex_digest(s: &str) -> Result<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("invalid MD5 digest {s:?}");
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| anyhow!("invalid MD5 digest {s:?}"))?;
    }
    Ok(out)
}

/// `end`: the sender's stream is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub chunks: u64,
    pub bytes: u64,
    pub status: Status,
}

impl End {
    pub fn parse(text: &str) -> Result<End> {
        let (f, _) = parse_fields(text, &["chunks", "bytes", "status"], false)
            .context("invalid end marker")?;
        let end = End {
            chunks: parse_u64(f[0]).context("invalid end marker")?,
            bytes: parse_u64(f[1]).context("invalid end marker")?,
            status: Status::parse(f[2]).context("invalid end marker")?,
        };
        if !end.status.success() {
            bail!("invalid end marker: status {} is not success", f[2]);
        }
        if (end.chunks == 0) != (end.bytes == 0) {
            bail!(
                "invalid end marker: {} chunks of {} bytes",
                end.chunks,
                end.bytes
            );
        }
        Ok(end)
    }

    pub fn render(&self) -> String {
        format!(
            "chunks {}\nbytes {}\nstatus {}\n",
            self.chunks,
            self.bytes,
            self.status.render()
        )
    }
}

/// `error` (sender) and `abort` (its copy in the receiver's folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: Status,
    pub stderr: String,
}

impl Failure {
    pub fn parse(text: &str) -> Result<Failure> {
        let (f, body) = parse_fields(text, &["status"], true).context("invalid error marker")?;
        let status = Status::parse(f[0]).context("invalid error marker")?;
        if status.success() {
            bail!("invalid error marker: status is success");
        }
        Ok(Failure {
            status,
            stderr: body.unwrap_or("").to_string(),
        })
    }

    pub fn render(&self) -> String {
        format!("status {}\n\n{}", self.status.render(), self.stderr)
    }
}

/// `progress`: the receiver expects chunk `next` and has given `bytes` to zfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub next: u64,
    pub bytes: u64,
}

impl Progress {
    pub fn parse(text: &str) -> Result<Progress> {
        let (f, _) =
            parse_fields(text, &["next", "bytes"], false).context("invalid progress marker")?;
        Ok(Progress {
            next: parse_u64(f[0]).context("invalid progress marker")?,
            bytes: parse_u64(f[1]).context("invalid progress marker")?,
        })
    }

    pub fn render(&self) -> String {
        format!("next {}\nbytes {}\n", self.next, self.bytes)
    }
}

/// `resend`: chunk `index` failed verification `attempt` times; copy it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resend {
    pub index: u64,
    pub attempt: u32,
}

impl Resend {
    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Resend> {
        let (f, _) =
            parse_fields(text, &["index", "attempt"], false).context("invalid resend marker")?;
        let attempt = parse_u64(f[1]).context("invalid resend marker")?;
        Ok(Resend {
            index: parse_u64(f[0]).context("invalid resend marker")?,
            attempt: u32::try_from(attempt)
                .map_err(|_| anyhow!("invalid resend marker: attempt {attempt} too large"))?,
        })
    }

    pub fn render(&self) -> String {
        format!("index {}\nattempt {}\n", self.index, self.attempt)
    }
}

/// How the receiver's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every chunk verified and given to zfs receive, which exited 0.
    Ok,
    /// zfs receive failed (or could not start).
    Failed,
    /// The orchestrator relayed the sender's failure; zfs receive was ended.
    Aborted,
    /// A chunk kept failing MD5, or the stream disagreed with `end`.
    Corrupt,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
            Outcome::Corrupt => "corrupt",
        }
    }

    fn parse(s: &str) -> Result<Outcome> {
        Ok(match s {
            "ok" => Outcome::Ok,
            "failed" => Outcome::Failed,
            "aborted" => Outcome::Aborted,
            "corrupt" => Outcome::Corrupt,
            _ => bail!("invalid outcome {s:?}"),
        })
    }
}

/// `result`: what the receiver's zfs receive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvResult {
    pub outcome: Outcome,
    pub status: Status,
    pub chunks: u64,
    pub bytes: u64,
    /// zfs receive's stderr, or the reason for `corrupt`.
    pub stderr: String,
}

impl RecvResult {
    pub fn parse(text: &str) -> Result<RecvResult> {
        let (f, body) = parse_fields(text, &["outcome", "status", "chunks", "bytes"], true)
            .context("invalid result marker")?;
        let r = RecvResult {
            outcome: Outcome::parse(f[0]).context("invalid result marker")?,
            status: Status::parse(f[1]).context("invalid result marker")?,
            chunks: parse_u64(f[2]).context("invalid result marker")?,
            bytes: parse_u64(f[3]).context("invalid result marker")?,
            stderr: body.unwrap_or("").to_string(),
        };
        if (r.outcome == Outcome::Ok) != r.status.success() {
            bail!(
                "invalid result marker: outcome {} with status {}",
                f[0],
                f[1]
            );
        }
        Ok(r)
    }

    pub fn render(&self) -> String {
        format!(
            "outcome {}\nstatus {}\nchunks {}\nbytes {}\n\n{}",
            self.outcome.as_str(),
            self.status.render(),
            self.chunks,
            self.bytes,
            self.stderr
        )
    }
}

/// Keeps at most STDERR_MAX bytes of a process's stderr, as text.
pub fn cap_stderr(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(STDERR_MAX)];
    String::from_utf8_lossy(cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::protocol::folder::parse_chunk_file_name;
    #[test]
    fn md5_file_parses_and_rejects_hostile_content() {
        let d = [0xabu8; 16];
        let text = render_md5(3, &d);
        assert_eq!(text, format!("{}  chunk-000000000003\n", "ab".repeat(16)));
        assert_eq!(parse_md5(&text, 3).unwrap(), d);
        assert!(parse_md5(&text, 4).is_err(), "name of another chunk");
        for bad in [
            "",
            "\n",
            "abababababababababababababababab  chunk-000000000003",
            "abababababababababababababababab chunk-000000000003\n",
            "ababababababababababababababab  chunk-000000000003\n",
            "zzababababababababababababababab  chunk-000000000003\n",
            "ababababababababababababababababab  chunk-000000000003\n",
            "+bababababababababababababababab  chunk-000000000003\n",
            "abababababababababababababababé  chunk-000000000003\n",
            "abababababababababababababababab  chunk-000000000003\nextra\n",
        ] {
            assert!(parse_md5(bad, 3).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_round_trips() {
        for s in [
            Status::Exited(0),
            Status::Exited(1),
            Status::Exited(-1),
            Status::Signaled(9),
            Status::Helper,
        ] {
            assert_eq!(Status::parse(&s.render()).unwrap(), s);
        }
        for bad in [
            "",
            "exit",
            "exit x",
            "exit 1 2",
            "signal",
            "helper 1",
            "exit 99999999999",
            "exit +1",
            "EXIT 1",
            "exit  1",
        ] {
            assert!(Status::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn end_marker_parses_and_rejects_corrupt_ones() {
        let e = End {
            chunks: 3,
            bytes: 10_000,
            status: Status::Exited(0),
        };
        assert_eq!(End::parse(&e.render()).unwrap(), e);
        let empty = End {
            chunks: 0,
            bytes: 0,
            status: Status::Exited(0),
        };
        assert_eq!(End::parse(&empty.render()).unwrap(), empty);
        // Field order does not matter; the trailing newline is optional.
        assert_eq!(
            End::parse("status exit 0\nbytes 10000\nchunks 3").unwrap(),
            e
        );
        for bad in [
            "",
            "chunks 3\nbytes 10000\n",
            "chunks 3\nbytes 10000\nstatus exit 1\n",
            "chunks 3\nchunks 3\nbytes 10000\nstatus exit 0\n",
            "chunks 3\nbytes 10000\nstatus exit 0\nextra 1\n",
            "chunks -3\nbytes 10000\nstatus exit 0\n",
            "chunks 3\nbytes 99999999999999999999999\nstatus exit 0\n",
            "chunks 3\nbytes 10000\nstatus exit 0\n\nbody\n",
            "chunks 0\nbytes 5\nstatus exit 0\n",
            "chunks 3\r\nbytes 10000\r\nstatus exit 0\r\n",
            "chunks3\nbytes 10000\nstatus exit 0\n",
            "\u{0}\u{0}\u{0}",
        ] {
            assert!(End::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn error_marker_carries_stderr_verbatim() {
        let f = Failure {
            status: Status::Exited(1),
            stderr: "cannot open 'p/x@s': dataset does not exist\n\nmore\n".into(),
        };
        assert_eq!(Failure::parse(&f.render()).unwrap(), f);
        let no_body = Failure::parse("status signal 9\n").unwrap();
        assert_eq!(
            no_body,
            Failure {
                status: Status::Signaled(9),
                stderr: String::new()
            }
        );
        assert_eq!(
            Failure::parse("status helper\n\n").unwrap().status,
            Status::Helper
        );
        for bad in [
            "",
            "status exit 0\n\n",
            "status\n\nx",
            "stat exit 1\n\nx",
            "status exit 1\nstatus exit 2\n\n",
        ] {
            assert!(Failure::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn progress_and_resend_markers_round_trip_and_reject_junk() {
        let p = Progress {
            next: 12,
            bytes: 123_456,
        };
        assert_eq!(Progress::parse(&p.render()).unwrap(), p);
        let r = Resend {
            index: 4,
            attempt: 2,
        };
        assert_eq!(Resend::parse(&r.render()).unwrap(), r);
        for bad in [
            "",
            "next 1\n",
            "next 1\nbytes x\n",
            "next 1\nbytes 2\nnext 3\n",
            "next 1 \nbytes 2\n",
            "next 1\nbytes 2\n\n",
        ] {
            assert!(Progress::parse(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "index 1\n",
            "index 1\nattempt 4294967296\n",
            "index 1\nattempt 2\nfoo bar\n",
        ] {
            assert!(Resend::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn result_marker_round_trips_and_checks_consistency() {
        let r = RecvResult {
            outcome: Outcome::Failed,
            status: Status::Exited(1),
            chunks: 2,
            bytes: 77,
            stderr: "cannot receive: destination exists\n".into(),
        };
        assert_eq!(RecvResult::parse(&r.render()).unwrap(), r);
        let ok = RecvResult {
            outcome: Outcome::Ok,
            status: Status::Exited(0),
            chunks: 5,
            bytes: 9,
            stderr: String::new(),
        };
        assert_eq!(RecvResult::parse(&ok.render()).unwrap(), ok);
        for bad in [
            "outcome ok\nstatus exit 1\nchunks 0\nbytes 0\n",
            "outcome failed\nstatus exit 0\nchunks 0\nbytes 0\n",
            "outcome maybe\nstatus exit 1\nchunks 0\nbytes 0\n",
            "outcome failed\nstatus exit 1\nchunks 0\n",
            "",
        ] {
            assert!(RecvResult::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parsers() {
        // A small deterministic fuzz over marker-like and random inputs.
        let seeds = [
            "chunks 1\nbytes 2\nstatus exit 0\n",
            "status exit 1\n\nerr",
            "next 1\nbytes 2\n",
            "outcome ok\nstatus exit 0\nchunks 1\nbytes 1\n\n",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut bytes = seeds[round % seeds.len()].as_bytes().to_vec();
            let pos = (x as usize) % (bytes.len() + 1);
            match x % 4 {
                0 => bytes.insert(pos, (x >> 8) as u8),
                1 if pos < bytes.len() => {
                    bytes.remove(pos);
                }
                2 if pos < bytes.len() => bytes[pos] = (x >> 16) as u8,
                _ => bytes.truncate(pos),
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = End::parse(&text);
            let _ = Failure::parse(&text);
            let _ = Progress::parse(&text);
            let _ = Resend::parse(&text);
            let _ = RecvResult::parse(&text);
            let _ = parse_md5(&text, 1);
            let _ = parse_chunk_file_name(&text);
            let _ = Status::parse(&text);
        }
    }
}
