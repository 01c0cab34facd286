//! Names in the chunk protocol: session ids, session folder names and the
//! chunk file names (`chunk-<index:012>` and its `.md5`), with their
//! parsers. Pure: it touches no file.

use std::ffi::OsStr;
use std::path::Path;

#[cfg(test)]
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use super::SESSION_PREFIX;

/// Checks a session id: 16 to 32 lowercase hex digits.
pub fn validate_session_id(id: &str) -> Result<()> {
    let ok = (16..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        bail!("invalid chunk session id {id:?}: expected 16 to 32 lowercase hex digits");
    }
    Ok(())
}

#[cfg(test)]
/// `<tmpdir>/resync-<id>`.
pub fn session_dir(tmpdir: &Path, id: &str) -> Result<PathBuf> {
    validate_session_id(id)?;
    Ok(tmpdir.join(format!("{SESSION_PREFIX}{id}")))
}

/// The session id of a folder named `resync-<id>`, if its name is one.
pub fn session_id_of(dir: &Path) -> Result<&str> {
    let name = dir
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| anyhow!("chunk session folder {} has no name", dir.display()))?;
    let id = name.strip_prefix(SESSION_PREFIX).ok_or_else(|| {
        anyhow!(
            "chunk session folder {} is not named {SESSION_PREFIX}<id>",
            dir.display()
        )
    })?;
    validate_session_id(id)?;
    Ok(id)
}

pub fn chunk_name(index: u64) -> String {
    format!("chunk-{index:012}")
}

pub fn md5_name(index: u64) -> String {
    format!("chunk-{index:012}.md5")
}

/// A complete (not `.part`) chunk file name in a session folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkFile {
    Data(u64),
    Md5(u64),
}

impl ChunkFile {
    pub fn index(self) -> u64 {
        match self {
            ChunkFile::Data(i) | ChunkFile::Md5(i) => i,
        }
    }
}

/// Parses `chunk-NNNNNNNNNNNN` or `chunk-NNNNNNNNNNNN.md5`; anything else
/// (including `.part` files) is None.
pub fn parse_chunk_file_name(name: &str) -> Option<ChunkFile> {
    let rest = name.strip_prefix("chunk-")?;
    let (digits, md5) = match rest.strip_suffix(".md5") {
        Some(d) => (d, true),
        None => (rest, false),
    };
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index = digits.parse().ok()?;
    Some(if md5 {
        ChunkFile::Md5(index)
    } else {
        ChunkFile::Data(index)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_16_to_32_lowercase_hex() {
        assert!(validate_session_id("0123456789abcdef").is_ok());
        assert!(validate_session_id(&"a".repeat(32)).is_ok());
        for bad in [
            "",
            "0123456789abcde",
            &"a".repeat(33),
            "0123456789ABCDEF",
            "../../etc/passwd0",
            "0123456789abcdeg",
            "0123456789abcde/",
        ] {
            assert!(validate_session_id(bad).is_err(), "{bad:?}");
        }
        let d = session_dir(Path::new("/tmp"), "0123456789abcdef").unwrap();
        assert_eq!(d, Path::new("/tmp/resync-0123456789abcdef"));
        assert_eq!(session_id_of(&d).unwrap(), "0123456789abcdef");
        assert!(session_id_of(Path::new("/tmp/other-0123456789abcdef")).is_err());
        assert!(session_id_of(Path::new("/")).is_err());
    }

    #[test]
    fn chunk_names_round_trip_and_parts_are_ignored() {
        assert_eq!(chunk_name(7), "chunk-000000000007");
        assert_eq!(md5_name(7), "chunk-000000000007.md5");
        assert_eq!(
            parse_chunk_file_name("chunk-000000000007"),
            Some(ChunkFile::Data(7))
        );
        assert_eq!(
            parse_chunk_file_name("chunk-999999999999.md5"),
            Some(ChunkFile::Md5(999_999_999_999))
        );
        for bad in [
            "chunk-000000000007.part",
            "chunk-000000000007.md5.part",
            "chunk-7",
            "chunk-0000000000007",
            "chunk-00000000000a",
            "chunk--00000000001",
            "end",
            "chunk-+00000000001",
            "xchunk-000000000001",
        ] {
            assert_eq!(parse_chunk_file_name(bad), None, "{bad}");
        }
    }
}
