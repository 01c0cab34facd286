//! Moves one byte stream from a reader to a writer (`zfs send`'s stdout into
//! `zfs receive`'s stdin, on whatever hosts they run) on two threads, so that
//! reading on one side overlaps writing on the other. It counts bytes for
//! progress and tells the caller which side failed; it knows nothing of ZFS.
//! With a [`Limiter`] the writing side splits each buffer into small chunks
//! and waits for the bucket before each one (`--source/target-bwlimit`).

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::thread;

use crate::bwlimit::Limiter;

/// Size of one buffer handed from the reading thread to the writing one.
const BUF: usize = 256 * 1024;
/// Buffers in flight between the threads (bounds memory to BUF * DEPTH).
const DEPTH: usize = 16;

/// Which end of the pump failed.
#[derive(Debug)]
pub enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl std::fmt::Display for PumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PumpError::Read(e) => write!(f, "reading the send stream failed: {e}"),
            PumpError::Write(e) => write!(f, "writing the receive stream failed: {e}"),
        }
    }
}

impl std::error::Error for PumpError {}

/// Copies `reader` to `writer` until EOF, calling `on_bytes` after each write.
/// Returns the byte count. With `limit`, writes are split into the limiter's
/// chunk size and each waits for its tokens first, so the stream averages the
/// limiter's rate; the throttled writer slows the reader in turn, through the
/// bounded queue and then the producer's pipe. The writer is flushed and
/// dropped (EOF to its process) before returning, on success and on failure
/// alike. If writing
/// fails the reading thread is left to end when its reader does: the caller
/// kills the producing process so that it does.
pub fn pump(
    mut reader: Box<dyn Read + Send>,
    mut writer: Box<dyn Write + Send>,
    mut limit: Option<Limiter>,
    on_bytes: &dyn Fn(u64),
) -> Result<u64, PumpError> {
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(DEPTH);
    let reading = thread::spawn(move || loop {
        let mut buf = vec![0u8; BUF];
        let mut filled = 0;
        // Fill the buffer as far as the reader gives without blocking twice on
        // a slow producer: stop at the first short read after some data.
        let result = loop {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == BUF || filled >= BUF / 4 {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) if filled == 0 => return,
            Ok(()) => {
                buf.truncate(filled);
                if tx.send(Ok(buf)).is_err() {
                    return;
                }
            }
            Err(e) => {
                if filled > 0 {
                    buf.truncate(filled);
                    let _ = tx.send(Ok(buf));
                }
                let _ = tx.send(Err(e));
                return;
            }
        }
    });

    let mut total = 0u64;
    let outcome = loop {
        match rx.recv() {
            Ok(Ok(buf)) => {
                let chunk = limit.as_ref().map_or(buf.len(), Limiter::chunk).max(1);
                let written = buf.chunks(chunk).try_for_each(|piece| {
                    if let Some(l) = limit.as_mut() {
                        l.wait_for(piece.len());
                    }
                    writer.write_all(piece)?;
                    total += piece.len() as u64;
                    on_bytes(piece.len() as u64);
                    Ok(())
                });
                if let Err(e) = written {
                    break Err(PumpError::Write(e));
                }
            }
            Ok(Err(e)) => break Err(PumpError::Read(e)),
            Err(mpsc::RecvError) => break Ok(total),
        }
    };
    let outcome = match outcome {
        Ok(n) => writer.flush().map(|()| n).map_err(PumpError::Write),
        Err(e) => Err(e),
    };
    drop(writer);
    drop(rx);
    if outcome.is_ok() {
        let _ = reading.join();
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "receiver died"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct FailAfter(usize);
    impl Read for FailAfter {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("sender died"));
            }
            let n = b.len().min(self.0).min(1000);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn copies_every_byte_in_order_and_counts_them() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let out = Arc::new(Mutex::new(Vec::new()));
        let counted = AtomicU64::new(0);
        let n = pump(
            Box::new(io::Cursor::new(data.clone())),
            Box::new(Sink(out.clone())),
            None,
            &|b| {
                counted.fetch_add(b, Ordering::Relaxed);
            },
        )
        .unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(counted.load(Ordering::Relaxed), n);
        assert!(*out.lock().unwrap() == data);
    }

    #[test]
    fn a_dead_writer_is_a_write_error() {
        let r = pump(
            Box::new(io::repeat(1).take(1 << 20)),
            Box::new(Broken),
            None,
            &|_| {},
        );
        assert!(matches!(r, Err(PumpError::Write(_))));
    }

    #[test]
    fn a_dead_reader_is_a_read_error_after_its_data() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let r = pump(
            Box::new(FailAfter(5000)),
            Box::new(Sink(out.clone())),
            None,
            &|_| {},
        );
        assert!(matches!(r, Err(PumpError::Read(_))));
        assert_eq!(out.lock().unwrap().len(), 5000);
    }

    #[test]
    fn a_limited_pump_copies_everything_at_about_the_rate() {
        // 1.5 MiB at 2 MiB/s after a 104 KiB burst: about 0.7 s.
        let data: Vec<u8> = (0..1_572_864u32).map(|i| (i * 13 % 241) as u8).collect();
        let out = Arc::new(Mutex::new(Vec::new()));
        let calls = AtomicU64::new(0);
        let start = std::time::Instant::now();
        let n = pump(
            Box::new(io::Cursor::new(data.clone())),
            Box::new(Sink(out.clone())),
            Some(Limiter::new(2 << 20)),
            &|_| {
                calls.fetch_add(1, Ordering::Relaxed);
            },
        )
        .unwrap();
        let took = start.elapsed().as_secs_f64();
        assert_eq!(n, data.len() as u64);
        assert!(*out.lock().unwrap() == data);
        let ideal = (data.len() as f64 - (2 << 20) as f64 / 20.0) / (2 << 20) as f64;
        assert!(
            took >= ideal * 0.95 && took < ideal + 1.0,
            "{took}s, ideal {ideal}s"
        );
        // Writes were split: no more than a twentieth of a second's worth each.
        assert!(calls.load(Ordering::Relaxed) >= 15);
    }

    #[test]
    fn a_dead_writer_under_a_limit_is_still_a_write_error() {
        let r = pump(
            Box::new(io::repeat(1).take(1 << 20)),
            Box::new(Broken),
            Some(Limiter::new(1 << 30)),
            &|_| {},
        );
        assert!(matches!(r, Err(PumpError::Write(_))));
    }
}
