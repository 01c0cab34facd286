//! A host connection that survives being lost: [`Reconnecting`] holds the
//! current [`Host`] behind a lock that everyone reads it through, and the way
//! to open a new one. When a connection breaks, one caller replaces it and
//! every later reader gets the new one. Retrying follows one rule, written
//! here once: pause with [`Backoff`] (250 ms, doubling up to 4 s) between
//! attempts, and give up at a deadline the caller sets (`--timeout` without
//! progress). Only a lost connection ([`is_connection_lost`]) is worth a
//! retry; any other error is returned at once.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{is_connection_lost, Host};
use crate::sys::UnpoisonedRw;

/// Opens a fresh connection to the same host.
pub type Connect<'a> = dyn Fn() -> Result<Arc<dyn Host>> + Send + Sync + 'a;

/// Pauses between reconnection attempts: `first`, doubling each time, at
/// most `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// The first pause.
    pub const FIRST: Duration = Duration::from_millis(250);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(4);

    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { next: first, max }
    }

    /// The pause before the next attempt (each call doubles the one after).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        pause
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(Backoff::FIRST, Backoff::MAX)
    }
}

/// The swappable handle to one host, and how to reconnect it.
pub struct Reconnecting<'a> {
    current: RwLock<Arc<dyn Host>>,
    connect: Box<Connect<'a>>,
    backoff: Backoff,
}

impl<'a> Reconnecting<'a> {
    /// `host` is the connection to use now; `connect` opens another one.
    pub fn new(
        host: Arc<dyn Host>,
        connect: impl Fn() -> Result<Arc<dyn Host>> + Send + Sync + 'a,
    ) -> Reconnecting<'a> {
        Reconnecting {
            current: RwLock::new(host),
            connect: Box::new(connect),
            backoff: Backoff::default(),
        }
    }

    /// The same, pausing by `backoff` between attempts (for the chunk
    /// orchestrator, which keeps its own loop today, and for tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn with_backoff(mut self, backoff: Backoff) -> Reconnecting<'a> {
        self.backoff = backoff;
        self
    }

    /// The current connection.
    pub fn get(&self) -> Arc<dyn Host> {
        self.current.read_now().clone()
    }

    /// The lock the current connection lives in, for code that reads and
    /// replaces it itself (the chunk orchestrator's `HostCell`).
    pub fn cell(&self) -> &RwLock<Arc<dyn Host>> {
        &self.current
    }

    /// How to open a fresh connection (without installing it).
    pub fn connector(&self) -> &(dyn Fn() -> Result<Arc<dyn Host>> + Sync + 'a) {
        &*self.connect
    }

    /// One attempt at a fresh connection; on success it replaces the current
    /// one for every reader.
    pub fn reconnect(&self) -> Result<()> {
        let host = (self.connect)()?;
        *self.current.write_now() = host;
        Ok(())
    }

    /// Runs `op` on the current connection. When it fails because the
    /// connection was lost, reconnects (pausing by the backoff between
    /// attempts, `note` told of each failure) and runs it again, until
    /// `deadline`: then the last error is returned. Other errors are
    /// returned at once.
    pub fn retrying<T>(
        &self,
        deadline: Instant,
        note: &dyn Fn(&str),
        mut op: impl FnMut(&dyn Host) -> Result<T>,
    ) -> Result<T> {
        let mut backoff = self.backoff.clone();
        loop {
            let host = self.get();
            let err = match op(&*host) {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            if !is_connection_lost(&err) || Instant::now() >= deadline {
                return Err(err);
            }
            note(&format!("{err:#}; reconnecting"));
            loop {
                std::thread::sleep(backoff.next_pause());
                match self.reconnect() {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(e) => note(&format!("reconnecting failed: {e:#}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Child, CmdOutput, ConnectionLost};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    /// A host that only has a name: which connection it is.
    struct Named(String);

    impl Host for Named {
        fn label(&self) -> &str {
            &self.0
        }
        fn run(&self, _argv: &[String]) -> Result<CmdOutput> {
            anyhow::bail!("not a real host")
        }
        fn spawn(&self, _argv: &[String]) -> Result<Box<dyn Child>> {
            anyhow::bail!("not a real host")
        }
    }

    fn lost(host: &str) -> anyhow::Error {
        anyhow::Error::new(ConnectionLost {
            host: host.into(),
            reason: "cut".into(),
        })
        .context("running zfs")
    }

    fn quick() -> Backoff {
        Backoff::new(Duration::from_millis(1), Duration::from_millis(4))
    }

    /// A handle on "conn-0" whose reconnects make "conn-1", "conn-2", ...
    /// and fail while `failing` says so.
    fn numbered<'a>(made: &'a AtomicU32, failing: &'a Mutex<u32>) -> Reconnecting<'a> {
        Reconnecting::new(Arc::new(Named("conn-0".into())), move || {
            let mut failing = failing.lock().unwrap();
            if *failing > 0 {
                *failing -= 1;
                anyhow::bail!("connection refused");
            }
            let n = made.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Arc::new(Named(format!("conn-{n}"))) as Arc<dyn Host>)
        })
        .with_backoff(quick())
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::default();
        let pauses: Vec<u128> = (0..7).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(pauses, [250, 500, 1000, 2000, 4000, 4000, 4000]);
    }

    #[test]
    fn a_lost_connection_is_replaced_and_the_operation_run_again() {
        let (made, failing) = (AtomicU32::new(0), Mutex::new(0));
        let host = numbered(&made, &failing);
        let notes = Mutex::new(Vec::new());
        let mut seen = Vec::new();
        let got = host
            .retrying(
                Instant::now() + Duration::from_secs(10),
                &|n| notes.lock().unwrap().push(n.to_string()),
                |h| {
                    seen.push(h.label().to_string());
                    if seen.len() < 3 {
                        Err(lost(h.label()))
                    } else {
                        Ok(h.label().len())
                    }
                },
            )
            .unwrap();
        assert_eq!(got, "conn-2".len());
        assert_eq!(seen, ["conn-0", "conn-1", "conn-2"]);
        assert_eq!(host.get().label(), "conn-2", "everyone sees the new one");
        assert_eq!(host.cell().read().unwrap().label(), "conn-2");
        assert_eq!(notes.lock().unwrap().len(), 2);
    }

    #[test]
    fn other_errors_are_not_retried() {
        let (made, failing) = (AtomicU32::new(0), Mutex::new(0));
        let host = numbered(&made, &failing);
        let mut calls = 0;
        let err = host
            .retrying(
                Instant::now() + Duration::from_secs(10),
                &|_| {},
                |_| -> Result<()> {
                    calls += 1;
                    anyhow::bail!("zfs: dataset does not exist")
                },
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "zfs: dataset does not exist");
        assert_eq!((calls, made.load(Ordering::SeqCst)), (1, 0));
        assert_eq!(host.get().label(), "conn-0");
    }

    #[test]
    fn failed_reconnects_are_retried_with_backoff() {
        let (made, failing) = (AtomicU32::new(0), Mutex::new(3));
        let host = numbered(&made, &failing);
        let notes = Mutex::new(Vec::new());
        let mut calls = 0;
        host.retrying(
            Instant::now() + Duration::from_secs(10),
            &|n| notes.lock().unwrap().push(n.to_string()),
            |h| {
                calls += 1;
                if calls == 1 {
                    Err(lost(h.label()))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap();
        assert_eq!(host.get().label(), "conn-1");
        let notes = notes.lock().unwrap();
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert!(notes[1..]
            .iter()
            .all(|n| n == "reconnecting failed: connection refused"));
    }

    #[test]
    fn at_the_deadline_the_last_error_is_returned() {
        // The host cannot be reached again: the connect error comes back.
        let (made, failing) = (AtomicU32::new(0), Mutex::new(u32::MAX));
        let host = numbered(&made, &failing);
        let start = Instant::now();
        let err = host
            .retrying(
                start + Duration::from_millis(50),
                &|_| {},
                |h| -> Result<()> { Err(lost(h.label())) },
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "connection refused");
        assert!(start.elapsed() < Duration::from_secs(2));

        // Every connection breaks: the operation's own error comes back.
        let (made, failing) = (AtomicU32::new(0), Mutex::new(0));
        let host = numbered(&made, &failing);
        let err = host
            .retrying(
                Instant::now() + Duration::from_millis(30),
                &|_| {},
                |h| -> Result<()> { Err(lost(h.label())) },
            )
            .unwrap_err();
        assert!(is_connection_lost(&err));
        assert!(made.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn reconnect_swaps_the_handle_once_per_success() {
        let (made, failing) = (AtomicU32::new(0), Mutex::new(1));
        let host = numbered(&made, &failing);
        assert!(host.reconnect().is_err());
        assert_eq!(
            host.get().label(),
            "conn-0",
            "a failed attempt changes nothing"
        );
        host.reconnect().unwrap();
        assert_eq!(host.get().label(), "conn-1");
        let fresh = (host.connector())().unwrap();
        assert_eq!(fresh.label(), "conn-2");
        assert_eq!(host.get().label(), "conn-1", "connector() does not install");
    }
}
