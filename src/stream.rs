//! Moves one byte stream from a reader to a writer (`zfs send`'s stdout into
//! `zfs receive`'s stdin, on whatever hosts they run) on two threads, so that
//! reading on one side overlaps writing on the other. It counts bytes for
//! progress and tells the caller which side failed; it knows nothing of ZFS.

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::thread;

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
/// Returns the byte count. The writer is flushed and dropped (EOF to its
/// process) before returning, on success and on failure alike. If writing
/// fails the reading thread is left to end when its reader does: the caller
/// kills the producing process so that it does.
pub fn pump(
    mut reader: Box<dyn Read + Send>,
    mut writer: Box<dyn Write + Send>,
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
                if let Err(e) = writer.write_all(&buf) {
                    break Err(PumpError::Write(e));
                }
                total += buf.len() as u64;
                on_bytes(buf.len() as u64);
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
            &|_| {},
        );
        assert!(matches!(r, Err(PumpError::Read(_))));
        assert_eq!(out.lock().unwrap().len(), 5000);
    }
}
