//! Both ends of the serve protocol against each other: a chunk server
//! (`helper/server.rs`) on one end of a socket pair, a [`Client`]
//! (`driver/client.rs`) on the other. The only place that sees both.

use std::fs;
use std::io::{self, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use super::driver::client::{is_no_space_error, Client};
use super::helper::files::prepare_session_dir;
use super::helper::server::{reply_err, serve};
use super::protocol::folder::{chunk_name, md5_name};
use super::protocol::frames::{
    kind, read_frame, write_frame, Op, ERR_NO_SPACE, FRAME_MAX, HELLO_TEXT,
};
use super::protocol::markers::render_md5;
use super::protocol::{END, PART, PROGRESS, RESEND};
use md5::{Digest, Md5};
use std::os::unix::net::UnixStream;

/// A server thread on one end of a socket pair, a client on the other.
fn pair(dir: &Path) -> (Client, std::thread::JoinHandle<Result<()>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let dir = dir.to_path_buf();
    let b2 = b.try_clone().unwrap();
    let server = std::thread::spawn(move || {
        let mut r = BufReader::new(b);
        let mut w = BufWriter::new(b2);
        serve(&dir, &mut r, &mut w)
    });
    let a2 = a.try_clone().unwrap();
    (Client::from_io(Box::new(a), Box::new(a2)).unwrap(), server)
}

fn session(tmp: &Path) -> PathBuf {
    let d = tmp.join("resync-0123456789abcdef");
    prepare_session_dir(&d).unwrap();
    d
}

fn md5_line(index: u64, data: &[u8]) -> String {
    render_md5(index, &Md5::digest(data).into())
}

#[test]
fn poll_applies_ops_and_lists_chunks_parts_and_markers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = session(tmp.path());
    fs::write(d.join(chunk_name(1)), b"hello").unwrap();
    fs::write(d.join(md5_name(1)), md5_line(1, b"hello")).unwrap();
    fs::write(d.join("chunk-000000000002.part"), b"abc").unwrap();
    fs::write(d.join(RESEND), b"index 0\nattempt 1\n").unwrap();
    fs::write(d.join("stray"), b"x").unwrap();
    let (mut c, _s) = pair(&d);
    let end = "chunks 1\nbytes 5\nstatus exit 0\n";
    let f = c
        .poll(&[Op::Rm(RESEND.into()), Op::Put(END.into(), end.into())])
        .unwrap();
    assert!(!f.gone);
    assert_eq!(f.chunks[&1], (Some(5), Some(md5_line(1, b"hello"))));
    assert_eq!(f.parts[&2], 3);
    assert_eq!(f.markers[END], end);
    assert!(!f.markers.contains_key(RESEND));
    // Hostile ops are refused and end the conversation.
    let (mut c2, s2) = pair(&d);
    assert!(c2.poll(&[Op::Rm("../../etc/passwd".into())]).is_err());
    assert!(s2.join().unwrap().is_err());
    assert!(c.poll(&[Op::Put(PROGRESS.into(), "x".into())]).is_err());
    fs::remove_dir_all(&d).unwrap();
    let (mut c3, _s3) = pair(&d);
    assert!(c3.poll(&[]).unwrap().gone);
}

#[test]
fn a_chunk_crosses_and_resumes_from_its_part_size() {
    let tmp = tempfile::tempdir().unwrap();
    let src = session(tmp.path());
    let dst = tmp.path().join("resync-fedcba9876543210");
    prepare_session_dir(&dst).unwrap();
    let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    fs::write(src.join(chunk_name(4)), &data).unwrap();
    let md5 = md5_line(4, &data);
    // An earlier copy got 300000 bytes across.
    fs::write(dst.join("chunk-000000000004.part"), &data[..300_000]).unwrap();
    let (mut s, _a) = pair(&src);
    let (mut r, _b) = pair(&dst);
    let off = r.begin_write(4, data.len() as u64, &md5).unwrap();
    assert_eq!(off, 300_000);
    s.begin_read(4, off).unwrap();
    let mut moved = 0u64;
    loop {
        match s.next_data().unwrap() {
            Ok(piece) => {
                moved += piece.len() as u64;
                let piece = piece.to_vec();
                r.send_data(&piece).unwrap();
                r.sync(1).unwrap();
            }
            Err(n) => {
                assert_eq!(n, moved);
                break;
            }
        }
    }
    r.end_write().unwrap();
    assert_eq!(moved, 400_000);
    assert_eq!(fs::read(dst.join(chunk_name(4))).unwrap(), data);
    assert_eq!(fs::read_to_string(dst.join(md5_name(4))).unwrap(), md5);
    assert!(!dst.join("chunk-000000000004.part").exists());
    // Writing it again accepts nothing and changes nothing.
    assert_eq!(r.begin_write(4, data.len() as u64, &md5).unwrap(), 700_000);
    r.end_write().unwrap();
    // A short write is refused and keeps what arrived for a resume.
    assert_eq!(r.begin_write(5, 10, "x\n").unwrap(), 0);
    r.send_data(b"12345").unwrap();
    let e = r.end_write().unwrap_err();
    assert!(format!("{e:#}").contains("5 of 10 bytes"), "{e:#}");
    assert_eq!(r.begin_write(5, 10, "x\n").unwrap(), 5);
    // Too much is refused too.
    r.send_data(b"1234567").unwrap();
    assert!(r.end_write().is_err());
    // Reading a missing chunk or past its end is an error reply.
    s.begin_read(9, 0).unwrap();
    assert!(s.next_data().is_err());
    s.begin_read(4, 700_001).unwrap();
    assert!(s.next_data().is_err());
    // The conversation goes on after error replies.
    assert!(!s.poll(&[]).unwrap().gone);
}

#[test]
fn a_stale_writer_cannot_rename_a_newer_part() {
    let tmp = tempfile::tempdir().unwrap();
    let d = session(tmp.path());
    let (mut old, _a) = pair(&d);
    assert_eq!(old.begin_write(0, 4, "m\n").unwrap(), 0);
    old.send_data(b"ab").unwrap();
    old.flush().unwrap();
    // Meanwhile the chunk is rejected and a new copy starts.
    std::thread::sleep(Duration::from_millis(100));
    fs::remove_file(d.join("chunk-000000000000.part")).unwrap();
    let (mut new, _b) = pair(&d);
    assert_eq!(new.begin_write(0, 4, "m\n").unwrap(), 0);
    old.send_data(b"cd").unwrap();
    assert!(
        old.end_write().is_err(),
        "the old writer's file was replaced"
    );
    new.send_data(b"abcd").unwrap();
    new.end_write().unwrap();
    assert_eq!(fs::read(d.join(chunk_name(0))).unwrap(), b"abcd");
}

#[test]
fn malformed_frames_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = session(tmp.path());
    let mut bad: Vec<Vec<u8>> = vec![
        vec![kind::READ, 0, 0, 0, 3, 1, 2, 3],
        vec![kind::DATA, 0, 0, 0, 1, 0],
        vec![kind::POLL, 0xff, 0xff, 0xff, 0xff],
        vec![kind::POLL, 0, 0, 0, 2, b'p', 9],
        vec![kind::WRITE, 0, 0, 0, 1, 0],
        vec![kind::POLL, 0, 0, 0],
        vec![b'?', 0, 0, 0, 0],
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 40) as usize;
        bad.push(
            (0..len)
                .map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8)
                .collect(),
        );
    }
    for input in bad {
        let mut out = Vec::new();
        // Never a panic; at most an error.
        let _ = serve(&d, &mut &input[..], &mut out);
    }
    // And the client side: garbage instead of HELLO, oversized frames.
    let no_hello: Box<dyn Read + Send> = Box::new(io::Cursor::new(b"Hxxxxxx".to_vec()));
    assert!(Client::from_io(no_hello, Box::new(io::sink())).is_err());
    let mut huge = vec![kind::HELLO];
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    let huge: Box<dyn Read + Send> = Box::new(io::Cursor::new(huge));
    assert!(Client::from_io(huge, Box::new(io::sink())).is_err());
}

#[test]
fn a_full_disk_is_reported_as_no_space() {
    let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOSPC)).context("writing");
    let mut out = Vec::new();
    reply_err(&mut out, &e).unwrap();
    let mut buf = Vec::new();
    let k = read_frame(&mut &out[..], &mut buf, FRAME_MAX).unwrap();
    assert_eq!(k, Some(kind::ERR));
    assert_eq!(buf[0], ERR_NO_SPACE);
}

#[test]
fn a_full_disk_on_a_write_request_is_no_space_not_a_framing_error() {
    // The server refuses a write at once (its `.part` cannot be
    // created): the ERR reply names the long path, far over the 8 bytes
    // an OFFSET reply has.
    let path = format!("/tmp/resync-{}/{}{PART}", "ab".repeat(16), chunk_name(3));
    let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOSPC))
        .context(format!("opening {path}"));
    let mut server = Vec::new();
    write_frame(&mut server, kind::HELLO, HELLO_TEXT).unwrap();
    reply_err(&mut server, &e).unwrap();
    let r: Box<dyn Read + Send> = Box::new(io::Cursor::new(server));
    let mut c = Client::from_io(r, Box::new(io::sink())).unwrap();
    let err = c.begin_write(3, 100, "").unwrap_err();
    assert!(is_no_space_error(&err), "{err:#}");
    assert!(format!("{err:#}").contains(&path), "{err:#}");
}

/// Fix 11 of issue 9: the server opens its folder once and works through
/// that descriptor. A folder swapped for a symlink afterwards is not
/// followed: a read does not serve a chunk from the symlink's target, and
/// a marker goes into the folder the server opened.
#[test]
fn a_server_keeps_to_the_folder_it_opened_when_a_symlink_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = session(tmp.path());
    let (mut c, _s) = pair(&d);
    assert!(!c.poll(&[]).unwrap().gone, "the server has opened it");
    let moved = tmp.path().join("moved");
    let elsewhere = tmp.path().join("elsewhere");
    fs::rename(&d, &moved).unwrap();
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join(chunk_name(0)), b"not yours").unwrap();
    std::os::unix::fs::symlink(&elsewhere, &d).unwrap();
    c.begin_read(0, 0).unwrap();
    assert!(c.next_data().is_err(), "served a chunk through the symlink");
    let f = c.poll(&[Op::Put(END.into(), "chunks 0\n".into())]).unwrap();
    assert!(!f.gone);
    assert_eq!(fs::read(moved.join(END)).unwrap(), b"chunks 0\n");
    assert!(!elsewhere.join(END).exists());
}
