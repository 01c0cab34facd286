//! The remote ends of a compressed default-mode stream: hidden subcommands
//! of our binary, deployed to the host (`host/deploy.rs`) and started over
//! SSH in place of the bare zfs command (argv, no shell):
//! - `resync __encode --compress SPEC -- zfs send ...` runs `zfs send`,
//!   writes [`frame::MAGIC`], one frame per block of its output, and the
//!   end frame only if `zfs send` exited 0;
//! - `resync __decode -- zfs receive ...` runs `zfs receive` and feeds it
//!   what the frames on our stdin decode to; a malformed or truncated
//!   stream kills `zfs receive` (so the target keeps its state) and exits 1.
//!   Raw frames' payloads go from our stdin to zfs's with `splice(2)`
//!   (no copy through user space), where both are pipes.
//!
//! Both pass the zfs command's stderr through (the caller shows it) and exit
//! with its status (128 + signal), 1 when the stream failed, 2 on a bad
//! command line. [`encode_blocks`] is the reading side both the `__encode`
//! filter and the local pump (`transfer/pipe.rs`) use.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::process::Stdio;

use crate::sys::{exit_code, spawn_filtered as spawn, stop};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread;

use anyhow::{anyhow, bail, Context, Result};

use super::encoder::{Encoder, Stats, BLOCK};
use super::frame::{self, FrameReader, Framing, Part};
use super::Compress;

pub const ENCODE: &str = "__encode";
pub const DECODE: &str = "__decode";
/// The hidden subcommands `main` dispatches here.
pub const SUBCOMMANDS: [&str; 2] = [ENCODE, DECODE];
/// Frames queued toward the link (bounds memory to about 2 x DEPTH MiB).
pub const DEPTH: usize = 8;

/// `exe __encode --compress SPEC -- send...`
pub fn encode_argv(exe: &str, c: Compress, send: &[String]) -> Vec<String> {
    let mut v = vec![
        exe.to_string(),
        ENCODE.into(),
        "--compress".into(),
        c.spec(),
        "--".into(),
    ];
    v.extend_from_slice(send);
    v
}

/// `exe __decode -- recv...`
pub fn decode_argv(exe: &str, recv: &[String]) -> Vec<String> {
    let mut v = vec![exe.to_string(), DECODE.into(), "--".into()];
    v.extend_from_slice(recv);
    v
}

/// A filter's command line, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Encode(Compress, Vec<String>),
    Decode(Vec<String>),
}

fn parse(args: &[OsString]) -> Result<Cmd> {
    let args: Vec<&str> = args
        .iter()
        .map(|a| a.to_str().ok_or_else(|| anyhow!("invalid argument {a:?}")))
        .collect::<Result<_>>()?;
    let program = |rest: &[&str]| -> Result<Vec<String>> {
        match rest.split_first() {
            Some((&"--", argv)) if !argv.is_empty() => {
                Ok(argv.iter().map(|a| a.to_string()).collect())
            }
            _ => bail!("expected -- and the zfs command"),
        }
    };
    match args.as_slice() {
        [ENCODE, "--compress", spec, rest @ ..] => {
            let c = Compress::parse_spec(spec)?;
            if !c.is_on() {
                bail!("{ENCODE} needs a compression");
            }
            Ok(Cmd::Encode(c, program(rest)?))
        }
        [DECODE, rest @ ..] => Ok(Cmd::Decode(program(rest)?)),
        _ => bail!("usage: {ENCODE} --compress SPEC -- ARGV | {DECODE} -- ARGV"),
    }
}

/// Runs a filter subcommand; returns the exit code.
pub fn main(args: &[OsString]) -> i32 {
    let cmd = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("resync: error: {e:#}");
            return 2;
        }
    };
    let result = match cmd {
        Cmd::Encode(c, argv) => encode(c, &argv),
        Cmd::Decode(argv) => decode(&argv),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("resync: error: {e:#}");
            1
        }
    }
}

/// Reads `r` in blocks of [`BLOCK`] bytes, queues one frame per block on
/// `tx`, and tells the encoder per frame whether the queue was full (the
/// link is the bottleneck). Returns the encoder's totals at the end of
/// input; a read error is queued as well as returned. Stops early (Ok) when
/// the other end of `tx` is gone.
pub fn encode_blocks(
    r: &mut dyn Read,
    enc: &mut Encoder,
    tx: &SyncSender<io::Result<Vec<u8>>>,
) -> io::Result<Stats> {
    loop {
        // Read straight into the frame's buffer after room for its header:
        // a block that goes raw is queued as it is.
        let mut buf = Vec::with_capacity(frame::HEADER + BLOCK);
        buf.resize(frame::HEADER, 0);
        let read = (&mut *r).take(BLOCK as u64).read_to_end(&mut buf);
        if let Err(e) = read {
            let kept = io::Error::new(e.kind(), e.to_string());
            let _ = tx.send(Err(e));
            return Err(kept);
        }
        let filled = buf.len() - frame::HEADER;
        if filled > 0 {
            let out = enc.frame_in_place(buf)?;
            match tx.try_send(Ok(out)) {
                Ok(()) => enc.observe(false),
                Err(TrySendError::Full(out)) => {
                    enc.observe(true);
                    if tx.send(out).is_err() {
                        return Ok(enc.stats);
                    }
                }
                Err(TrySendError::Disconnected(_)) => return Ok(enc.stats),
            }
        }
        if filled < BLOCK {
            return Ok(enc.stats);
        }
    }
}

/// Our stdout or stdin as a file (a duplicate descriptor: unbuffered, and
/// no lock held).
fn own_fd(fd: std::os::fd::BorrowedFd<'_>) -> Result<File> {
    Ok(File::from(
        fd.try_clone_to_owned()
            .context("duplicating a descriptor")?,
    ))
}

fn encode(c: Compress, argv: &[String]) -> Result<i32> {
    let mut out = own_fd(io::stdout().as_fd())?;
    let mut child = spawn(argv, Stdio::null(), Stdio::piped())?;
    let Some(mut zfs_out) = child.stdout.take() else {
        stop(&mut child);
        bail!("zfs send has no stdout pipe");
    };
    let mut enc = Encoder::new(c).context("starting zstd")?;
    let (tx, rx) = mpsc::sync_channel(DEPTH);
    let reading = thread::spawn(move || encode_blocks(&mut zfs_out, &mut enc, &tx));
    let written = out.write_all(frame::MAGIC).and_then(|()| {
        for item in rx.iter() {
            out.write_all(&item?)?;
        }
        Ok(())
    });
    if let Err(e) = written {
        stop(&mut child);
        return Err(anyhow!(e).context("writing the compressed stream"));
    }
    let stats = reading
        .join()
        .map_err(|_| anyhow!("the compressing thread panicked"))?;
    let status = child.wait().context("waiting for zfs send")?;
    let stats = stats.context("reading zfs send's output")?;
    if !status.success() {
        return Ok(exit_code(status));
    }
    let mut end = Vec::new();
    frame::push_end(&mut end, stats.raw);
    out.write_all(&end)
        .context("writing the compressed stream")?;
    Ok(0)
}

/// Bytes moved per `splice` call: a pipe holds 64 KiB by default, so a
/// bigger request returns with what the pipe had.
const SPLICE_PIECE: usize = 1 << 20;

fn decode(argv: &[String]) -> Result<i32> {
    let input = own_fd(io::stdin().as_fd())?;
    let mut child = spawn(argv, Stdio::piped(), Stdio::inherit())?;
    let Some(mut zfs_in) = child.stdin.take() else {
        stop(&mut child);
        bail!("zfs receive has no stdin pipe");
    };
    // Unbuffered: raw payloads stay in the pipe for `splice` to move
    // straight into zfs receive's (random or already compressed data goes
    // raw, and then this hop copies nothing through user space). Where
    // either end is no pipe, raw payloads are read and written instead.
    let mut frames = FrameReader::new(input, Framing::Stream).context("starting zstd")?;
    let mut splicing = true;
    loop {
        let part = match splicing {
            true => frames.next_part(),
            false => frames.next_block().map(|b| b.map(Part::Block)),
        };
        let written = match part {
            Ok(Some(Part::Block(block))) => zfs_in.write_all(block),
            Ok(Some(Part::Raw(left))) => {
                let (from, to) = (frames.get_ref().as_raw_fd(), zfs_in.as_raw_fd());
                match splice(from, to, left.min(SPLICE_PIECE)) {
                    Ok(0) => {
                        stop(&mut child);
                        bail!("the compressed stream ended inside a frame; zfs receive stopped");
                    }
                    Ok(n) => {
                        frames.raw_moved(n);
                        Ok(())
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        splicing = false;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Ok(None) => break,
            Err(e) => {
                stop(&mut child);
                return Err(
                    anyhow!(e).context("the compressed stream is broken; zfs receive stopped")
                );
            }
        };
        if written.is_err() {
            // zfs receive stopped reading: its own status says why.
            drop(zfs_in);
            let status = child.wait().context("waiting for zfs receive")?;
            return Ok(if status.success() {
                1
            } else {
                exit_code(status)
            });
        }
    }
    drop(zfs_in);
    let status = child.wait().context("waiting for zfs receive")?;
    Ok(exit_code(status))
}

/// `splice(2)` of up to `len` bytes from the pipe `from` to the pipe `to`
/// (0 at the end of input); EINVAL where either is no pipe.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: plain fds this process owns; no offsets (pipes).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[String]) -> Vec<OsString> {
        v[1..].iter().map(OsString::from).collect()
    }

    #[test]
    fn argvs_round_trip_and_bad_ones_are_refused() {
        let send: Vec<String> = ["zfs", "send", "-I", "a@1", "a@2"]
            .map(String::from)
            .to_vec();
        let a = encode_argv("/x/resync", Compress::Adaptive, &send);
        assert_eq!(
            parse(&os(&a)).unwrap(),
            Cmd::Encode(Compress::Adaptive, send.clone())
        );
        let d = decode_argv("/x/resync", &send);
        assert_eq!(parse(&os(&d)).unwrap(), Cmd::Decode(send));
        for bad in [
            vec![ENCODE, "--compress", "none", "--", "zfs"],
            vec![ENCODE, "--compress", "zstd:3", "--"],
            vec![ENCODE, "--compress", "zstd:3", "zfs"],
            vec![DECODE],
            vec![DECODE, "zfs"],
            vec!["__other", "--", "zfs"],
        ] {
            let args: Vec<OsString> = bad.iter().map(OsString::from).collect();
            assert!(parse(&args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn encode_blocks_frames_everything_and_notices_a_full_queue() {
        let data: Vec<u8> = (0..5 * BLOCK + 77).map(|i| (i % 13) as u8).collect();
        let mut enc = Encoder::new(Compress::Adaptive).unwrap();
        let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(1);
        let reader = thread::spawn(move || {
            // A slow link: the queue fills.
            let mut frames = Vec::new();
            for f in rx.iter() {
                thread::sleep(std::time::Duration::from_millis(20));
                frames.push(f.unwrap());
            }
            frames
        });
        let stats = encode_blocks(&mut data.as_slice(), &mut enc, &tx).unwrap();
        drop(tx);
        let frames = reader.join().unwrap();
        assert_eq!(frames.len(), 6);
        assert_eq!(stats.raw, data.len() as u64);
        let mut framed = frame::MAGIC.to_vec();
        frames.iter().for_each(|f| framed.extend_from_slice(f));
        frame::push_end(&mut framed, stats.raw);
        let mut back = Vec::new();
        FrameReader::new(framed.as_slice(), Framing::Stream)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
    }
}
