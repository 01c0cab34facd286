//! The orchestrator's end of one chunk server (`driver` side of the serve
//! protocol, see `protocol/frames.rs`): [`Client`] starts `__chunk-serve`
//! on a host and polls, reads and writes chunks through it; [`ServeError`]
//! is a failure the server reported, typed so that a full disk can be told
//! apart from the rest.

use std::io::{BufReader, BufWriter, Read, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::chunk::protocol::command::HelperCommand;
use crate::chunk::protocol::frames::{
    encode_ops, kind, read_frame, write_frame, Fields, Folder, Op, DATA_MAX, ERR_MAX, ERR_NO_SPACE,
    ERR_OTHER, FRAME_MAX, HELLO_TEXT, LISTED_MARKERS, LIST_MAX, MD5_TEXT_MAX,
};
use crate::host::{Child, Host};

/// A failure the server reported (an ERR frame).
#[derive(Debug)]
pub struct ServeError {
    pub no_space: bool,
    pub message: String,
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServeError {}

/// Whether `e` is a server's report that its disk is full.
pub fn is_no_space_error(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<ServeError>().is_some_and(|s| s.no_space))
}

/// The orchestrator's end of one serve process.
pub struct Client {
    child: Option<Box<dyn Child>>,
    /// SYNC frames sent in the current write whose ACK we have not read.
    acks_due: u32,
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
    buf: Vec<u8>,
}

impl Client {
    /// Starts `exe __chunk-serve` on `host` for `dir` and reads its HELLO.
    pub fn start(host: &dyn Host, exe: &str, dir: &str, timeout: Duration) -> Result<Client> {
        let argv = HelperCommand::Serve {
            dir: dir.to_string(),
            timeout,
        }
        .to_argv(exe);
        let mut child = host
            .spawn(&argv)
            .with_context(|| format!("starting the chunk server on {}", host.label()))?;
        let (Some(out), Some(inp)) = (child.take_stdout(), child.take_stdin()) else {
            child.kill();
            bail!("internal error: chunk server pipes are missing");
        };
        Client::greet(Some(child), out, inp)
    }

    #[cfg(test)]
    /// A client over any pipe pair (tests); reads the HELLO.
    pub fn from_io(r: Box<dyn Read + Send>, w: Box<dyn Write + Send>) -> Result<Client> {
        Client::greet(None, r, w)
    }

    fn greet(
        child: Option<Box<dyn Child>>,
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
    ) -> Result<Client> {
        let mut c = Client {
            child,
            acks_due: 0,
            r: BufReader::with_capacity(DATA_MAX + 5, r),
            w: BufWriter::with_capacity(64 << 10, w),
            buf: Vec::new(),
        };
        match c.frame(FRAME_MAX)? {
            kind::HELLO if c.buf == HELLO_TEXT => Ok(c),
            _ => bail!("the chunk server did not greet us (a different resync version?)"),
        }
    }

    fn frame(&mut self, max: usize) -> Result<u8> {
        match read_frame(&mut self.r, &mut self.buf, max)? {
            Some(k) => Ok(k),
            None => bail!("the chunk server closed its output{}", self.exit_reason()),
        }
    }

    /// How the server process ended, with its last stderr line, if it
    /// tells within a moment (": exit 2: error: ...").
    fn exit_reason(&mut self) -> String {
        let Some(child) = self.child.take() else {
            return String::new();
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(Ok(exit)) => {
                let last = exit
                    .stderr
                    .trim_end()
                    .lines()
                    .last()
                    .unwrap_or("")
                    .to_string();
                format!(" (exit {}): {last}", exit.status)
            }
            _ => String::new(),
        }
    }

    fn send(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        write_frame(&mut self.w, kind, payload).context("writing to the chunk server")
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) -> Result<()> {
        self.w.flush().context("writing to the chunk server")
    }

    /// The error in an ERR frame just read.
    fn server_error(&self) -> anyhow::Error {
        let (class, text) = match self.buf.split_first() {
            Some((c, t)) => (*c, String::from_utf8_lossy(t).into_owned()),
            None => (ERR_OTHER, String::new()),
        };
        anyhow::Error::new(ServeError {
            no_space: class == ERR_NO_SPACE,
            message: text,
        })
    }

    fn unexpected(&self, k: u8, what: &str) -> anyhow::Error {
        if k == kind::ERR {
            self.server_error()
        } else {
            anyhow!(
                "unexpected frame {:?} from the chunk server {what}",
                k as char
            )
        }
    }

    /// Applies `ops`, then lists the folder.
    pub fn poll(&mut self, ops: &[Op]) -> Result<Folder> {
        self.send(kind::POLL, &encode_ops(ops))?;
        self.flush()?;
        let mut f = Folder::default();
        let mut entries = 0usize;
        loop {
            let k = self.frame(FRAME_MAX)?;
            entries += 1;
            if entries > LIST_MAX {
                bail!("the chunk server listed more than {LIST_MAX} entries");
            }
            let mut p = Fields::new(&self.buf);
            match k {
                kind::GONE if entries == 1 => {
                    p.end()?;
                    f.gone = true;
                    return Ok(f);
                }
                kind::LIST_END => {
                    p.end()?;
                    return Ok(f);
                }
                kind::CHUNK | kind::PART => {
                    let (index, size) = (p.u64()?, p.u64()?);
                    p.end()?;
                    if k == kind::CHUNK {
                        f.chunks.entry(index).or_default().0 = Some(size);
                    } else {
                        f.parts.insert(index, size);
                    }
                }
                kind::MD5 => {
                    let index = p.u64()?;
                    let text = String::from_utf8_lossy(p.rest()).into_owned();
                    if text.len() > MD5_TEXT_MAX {
                        bail!("oversized .md5 in listing");
                    }
                    f.chunks.entry(index).or_default().1 = Some(text);
                }
                kind::MARKER => {
                    let name = p.name()?.to_string();
                    if !LISTED_MARKERS.contains(&name.as_str()) {
                        bail!("unexpected marker {name:?} in listing");
                    }
                    let text = std::str::from_utf8(p.rest())
                        .map_err(|_| anyhow!("marker {name} in listing is not UTF-8"))?
                        .to_string();
                    if f.markers.insert(name.clone(), text).is_some() {
                        bail!("marker {name} listed twice");
                    }
                }
                other => return Err(self.unexpected(other, "in a listing")),
            }
        }
    }

    /// Starts writing chunk `index` of `total` bytes; returns the offset to
    /// send from. Follow with [`Client::send_data`] and [`Client::end_write`].
    pub fn begin_write(&mut self, index: u64, total: u64, md5: &str) -> Result<u64> {
        let mut p = Vec::with_capacity(16 + md5.len());
        p.extend_from_slice(&index.to_be_bytes());
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&md5.as_bytes()[..md5.len().min(MD5_TEXT_MAX)]);
        self.send(kind::WRITE, &p)?;
        self.flush()?;
        match self.frame(64)? {
            kind::OFFSET => {
                let mut f = Fields::new(&self.buf);
                let off = f.u64()?;
                f.end()?;
                if off > total {
                    bail!("the chunk server offers offset {off} of a {total}-byte chunk");
                }
                Ok(off)
            }
            k => Err(self.unexpected(k, "for a write")),
        }
    }

    pub fn send_data(&mut self, data: &[u8]) -> Result<()> {
        for piece in data.chunks(DATA_MAX) {
            self.send(kind::DATA, piece)?;
        }
        Ok(())
    }

    /// Asks the server to confirm what it has written so far; with
    /// `in_flight` SYNCs or more unconfirmed, waits for the oldest ACK.
    /// This bounds the bytes a cut can lose between us and the disk.
    pub fn sync(&mut self, in_flight: u32) -> Result<()> {
        self.send(kind::SYNC, &[])?;
        self.flush()?;
        self.acks_due += 1;
        while self.acks_due > in_flight {
            self.await_ack()?;
        }
        Ok(())
    }

    fn await_ack(&mut self) -> Result<()> {
        let k = self.frame(ERR_MAX)?;
        if k != kind::ACK {
            return Err(self.unexpected(k, "for a sync"));
        }
        self.acks_due -= 1;
        Ok(())
    }

    /// Ends a write; Ok once the chunk (data, then `.md5`) is in place.
    pub fn end_write(&mut self) -> Result<()> {
        self.send(kind::DONE, &[])?;
        self.flush()?;
        while self.acks_due > 0 {
            self.await_ack()?;
        }
        match self.frame(ERR_MAX)? {
            kind::OK => Ok(()),
            k => Err(self.unexpected(k, "after a write")),
        }
    }

    /// Starts reading chunk `index` from `offset`; then [`Client::next_data`].
    pub fn begin_read(&mut self, index: u64, offset: u64) -> Result<()> {
        let mut p = index.to_be_bytes().to_vec();
        p.extend_from_slice(&offset.to_be_bytes());
        self.send(kind::READ, &p)?;
        self.flush()
    }

    /// The next piece of a read, or None at its end (with the byte count
    /// the server says it sent).
    pub fn next_data(&mut self) -> Result<Result<&[u8], u64>> {
        match self.frame(ERR_MAX)? {
            kind::DATA => Ok(Ok(&self.buf)),
            kind::DONE => {
                let mut f = Fields::new(&self.buf);
                let n = f.u64()?;
                f.end()?;
                Ok(Err(n))
            }
            k => Err(self.unexpected(k, "in a read")),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing stdin ends a healthy server; a stuck channel is closed.
        if let Some(mut child) = self.child.take() {
            child.kill();
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}
