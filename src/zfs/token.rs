//! Resume tokens: decoding the `receive_resume_token` a target keeps after
//! an interrupted `zfs receive -s` into a typed [`ResumeToken`].
//!
//! Pure: text in, a [`ResumeToken`] or a [`TokenError`] out. Whether a
//! decoded token fits the planned transfer (it names this source's snapshot,
//! from a base both sides hold) is the planner's question, answered in
//! `plan::resume`; this module knows nothing of plans.
//!
//! The format (OpenZFS `zfs_send_resume_token_to_nvlist` in libzfs, the
//! kernel's `get_receive_resume_token`) is
//! `<version>-<checksum>-<packed length>-<payload>`: a decimal version (1),
//! the first word of a fletcher-4 checksum of the compressed payload, the
//! uncompressed length, both in hex, and the zlib-compressed packed nvlist
//! in hex. The kernel packs the nvlist with `fnvlist_pack`, i.e. in the
//! *native* encoding (not XDR): a 4-byte header (encoding 0, endianness),
//! the list's version and flags, then each pair as its in-memory `nvpair_t`
//! (size, name length, element count, type, name, value aligned to 8), and
//! a zero size to end the list. The real tokens in the tests below were
//! taken from OpenZFS 2.3.2.
//!
//! Hostile input cannot make us allocate much: the token's text, its
//! declared length and the inflated size are all capped ([`MAX_TOKEN_LEN`],
//! [`MAX_PACKED_LEN`]), and every length read from the nvlist is checked
//! against the bytes actually there. Nested nvlists (which no token has)
//! are rejected rather than guessed at.

use std::fmt;

/// The only token version OpenZFS has produced (`ZFS_SEND_RESUME_TOKEN_VERSION`).
const VERSION: u32 = 1;

/// Longest token text we decode. Real ones are a few hundred characters; a
/// redacted send's snapshot lists add 16 per snapshot.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Largest packed nvlist we inflate (the declared length is checked first).
pub const MAX_PACKED_LEN: usize = 256 * 1024;

/// A decoded resume token. Flags are the boolean pairs the kernel adds for
/// the stream's features; pairs we do not know are kept in `other`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeToken {
    /// Where the stream stopped: object number and offset within it.
    pub object: u64,
    pub offset: u64,
    /// Stream bytes the target has already received.
    pub bytes: u64,
    /// GUID of the snapshot being received.
    pub toguid: u64,
    /// Its full name on the sending side, `pool/ds@snap`.
    pub toname: String,
    /// GUID of the incremental base; `None` for a full stream.
    pub fromguid: Option<u64>,
    pub largeblockok: bool,
    pub embedok: bool,
    pub compressok: bool,
    pub rawok: bool,
    pub redact_snaps: Option<Vec<u64>>,
    pub book_redact_snaps: Option<Vec<u64>>,
    pub other: Vec<(String, Value)>,
}

impl ResumeToken {
    /// The dataset part of `toname` (before `@`).
    pub fn dataset(&self) -> &str {
        self.toname
            .split_once('@')
            .map_or(&self.toname, |(ds, _)| ds)
    }

    /// The snapshot part of `toname` (after `@`), if any.
    pub fn snapshot(&self) -> Option<&str> {
        self.toname.split_once('@').map(|(_, s)| s)
    }
}

/// One nvpair value, as far as tokens need them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `DATA_TYPE_BOOLEAN`: present means true.
    Flag,
    Uint64(u64),
    String(String),
    Uint64Array(Vec<u64>),
    /// Any other type, kept as its raw value bytes.
    Other {
        kind: i32,
        elements: i32,
        raw: Vec<u8>,
    },
}

/// Why a token does not decode. Each says which layer is broken, like
/// libzfs's own "resume token is corrupt (...)" messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    TooLong(usize),
    /// Not `<version>-<hex>-<hex>-<hex>`.
    Format(&'static str),
    Version(String),
    Hex,
    Checksum {
        stated: u64,
        computed: u64,
    },
    DeclaredLength(u64),
    Inflate,
    Length {
        declared: u64,
        actual: usize,
    },
    Nvlist(String),
    Missing(&'static str),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::TooLong(n) => {
                write!(f, "token is {n} characters long (at most {MAX_TOKEN_LEN})")
            }
            TokenError::Format(what) => write!(f, "invalid format: {what}"),
            TokenError::Version(v) => write!(f, "unknown version {v:?} (expected {VERSION})"),
            TokenError::Hex => f.write_str("payload is not hex-encoded"),
            TokenError::Checksum { stated, computed } => write!(
                f,
                "incorrect checksum: the token says {stated:x}, its payload sums to {computed:x}"
            ),
            TokenError::DeclaredLength(n) => write!(
                f,
                "declared nvlist length {n} is larger than {MAX_PACKED_LEN} bytes"
            ),
            TokenError::Inflate => f.write_str("decompression failed"),
            TokenError::Length { declared, actual } => write!(
                f,
                "decompressed to {actual} bytes, the token declares {declared}"
            ),
            TokenError::Nvlist(why) => write!(f, "bad nvlist: {why}"),
            TokenError::Missing(field) => write!(f, "no {field} in the token"),
        }
    }
}

impl std::error::Error for TokenError {}

/// Decodes a `receive_resume_token` value.
pub fn decode(token: &str) -> Result<ResumeToken, TokenError> {
    let token = token.trim();
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong(token.len()));
    }
    let mut parts = token.split('-');
    let (Some(version), Some(checksum), Some(length), Some(payload), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Format("expected four fields separated by '-'"));
    };
    if version.parse::<u32>().ok() != Some(VERSION) {
        return Err(TokenError::Version(version.chars().take(20).collect()));
    }
    let checksum = parse_hex_u64(checksum).ok_or(TokenError::Format("checksum is not hex"))?;
    let length = parse_hex_u64(length).ok_or(TokenError::Format("length is not hex"))?;
    let compressed = unhex(payload).ok_or(TokenError::Hex)?;
    let (le, be) = fletcher4_first_word(&compressed);
    if checksum != le && checksum != be {
        return Err(TokenError::Checksum {
            stated: checksum,
            computed: le,
        });
    }
    let declared = usize::try_from(length)
        .ok()
        .filter(|n| *n <= MAX_PACKED_LEN)
        .ok_or(TokenError::DeclaredLength(length))?;
    // One byte over the declared size is enough to tell "longer" apart.
    let packed = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&compressed, declared + 1)
        .map_err(|_| TokenError::Inflate)?;
    if packed.len() != declared {
        return Err(TokenError::Length {
            declared: length,
            actual: packed.len(),
        });
    }
    let pairs = unpack_native(&packed).map_err(TokenError::Nvlist)?;
    from_pairs(pairs)
}

fn parse_hex_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    s.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Word 0 of fletcher-4 over `data` (`fletcher_4_native_varsize`: 32-bit
/// words in the producer's byte order, a trailing partial word ignored), as
/// a little- and a big-endian producer would compute it.
fn fletcher4_first_word(data: &[u8]) -> (u64, u64) {
    let mut le = 0u64;
    let mut be = 0u64;
    for w in data.chunks_exact(4) {
        let w = [w[0], w[1], w[2], w[3]];
        le = le.wrapping_add(u64::from(u32::from_le_bytes(w)));
        be = be.wrapping_add(u64::from(u32::from_be_bytes(w)));
    }
    (le, be)
}

// nvpair data types (sys/nvpair.h) that tokens use.
const DATA_TYPE_BOOLEAN: i32 = 1;
const DATA_TYPE_UINT64: i32 = 8;
const DATA_TYPE_STRING: i32 = 9;
const DATA_TYPE_UINT64_ARRAY: i32 = 16;
const DATA_TYPE_NVLIST: i32 = 19;
const DATA_TYPE_NVLIST_ARRAY: i32 = 20;

/// `sizeof (nvpair_t)`: size, name length, reserved, elements, type.
const NVPAIR_HEADER: usize = 16;
/// Longest pair name we accept (nvpair names are short identifiers).
const MAX_NAME_LEN: usize = 256;

fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// A little reader over the packed bytes in the producer's byte order.
struct Reader<'a> {
    buf: &'a [u8],
    little: bool,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> Result<[u8; N], String> {
        at.checked_add(N)
            .and_then(|end| self.buf.get(at..end))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| format!("truncated at byte {at}"))
    }
    fn i32(&self, at: usize) -> Result<i32, String> {
        let b = self.bytes::<4>(at)?;
        Ok(if self.little {
            i32::from_le_bytes(b)
        } else {
            i32::from_be_bytes(b)
        })
    }
    fn i16(&self, at: usize) -> Result<i16, String> {
        let b = self.bytes::<2>(at)?;
        Ok(if self.little {
            i16::from_le_bytes(b)
        } else {
            i16::from_be_bytes(b)
        })
    }
    fn u64_at(&self, b: [u8; 8]) -> u64 {
        if self.little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    }
}

/// Unpacks a native-encoded nvlist of simple pairs (`nvlist_unpack`).
fn unpack_native(buf: &[u8]) -> Result<Vec<(String, Value)>, String> {
    let header = buf.get(..4).ok_or("shorter than its header")?;
    match header[0] {
        0 => {}
        1 => return Err("XDR-encoded (OpenZFS packs tokens natively)".into()),
        e => return Err(format!("unknown encoding {e}")),
    }
    let little = match header[1] {
        0 => false,
        1 => true,
        e => return Err(format!("unknown byte order {e}")),
    };
    let r = Reader { buf, little };
    // nvl_version, nvl_nvflag
    let version = r.i32(4)?;
    if version != 0 {
        return Err(format!("unknown nvlist version {version}"));
    }
    r.i32(8)?;
    let mut at = 12;
    let mut pairs: Vec<(String, Value)> = Vec::new();
    loop {
        let size = r.i32(at)?;
        if size == 0 {
            return Ok(pairs);
        }
        let size = usize::try_from(size).map_err(|_| format!("negative pair size at byte {at}"))?;
        let end = at
            .checked_add(size)
            .filter(|e| *e <= buf.len())
            .ok_or_else(|| format!("pair at byte {at} runs past the end ({size} bytes)"))?;
        let pair = &buf[at..end];
        let (name, value) = unpack_pair(&Reader { buf: pair, little })
            .map_err(|e| format!("pair at byte {at}: {e}"))?;
        if pairs.iter().any(|(n, _)| *n == name) {
            return Err(format!("pair {name:?} appears twice"));
        }
        pairs.push((name, value));
        at = end;
    }
}

fn unpack_pair(r: &Reader) -> Result<(String, Value), String> {
    let pair = r.buf;
    if pair.len() < NVPAIR_HEADER {
        return Err("shorter than a pair header".into());
    }
    let name_len = usize::try_from(r.i16(4)?).map_err(|_| "negative name length")?;
    let elements = r.i32(8)?;
    let kind = r.i32(12)?;
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err(format!("name length {name_len}"));
    }
    let name_end = NVPAIR_HEADER + name_len;
    let value_at = align8(name_end);
    if value_at > pair.len() {
        return Err("name runs past the pair".into());
    }
    let name = c_string(&pair[NVPAIR_HEADER..name_end]).ok_or("name is not a C string")?;
    if name.len() + 1 != name_len {
        return Err("name length does not match its string".into());
    }
    let value = &pair[value_at..];
    let count = |n: i32| usize::try_from(n).map_err(|_| format!("{n} elements"));
    let value = match kind {
        DATA_TYPE_BOOLEAN => Value::Flag,
        DATA_TYPE_UINT64 => {
            let b = value.get(..8).ok_or("uint64 value is truncated")?;
            Value::Uint64(r.u64_at(b.try_into().map_err(|_| "uint64")?))
        }
        DATA_TYPE_STRING => Value::String(c_string(value).ok_or("string value is not a C string")?),
        DATA_TYPE_UINT64_ARRAY => {
            let n = count(elements)?;
            let bytes = n
                .checked_mul(8)
                .filter(|b| *b <= value.len())
                .ok_or_else(|| format!("{n} uint64 elements do not fit in the pair"))?;
            Value::Uint64Array(
                value[..bytes]
                    .chunks_exact(8)
                    .map(|c| r.u64_at([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            )
        }
        DATA_TYPE_NVLIST | DATA_TYPE_NVLIST_ARRAY => {
            return Err(format!(
                "{name:?} is a nested nvlist, which tokens never hold"
            ))
        }
        _ => Value::Other {
            kind,
            elements,
            raw: value.to_vec(),
        },
    };
    Ok((name, value))
}

/// The UTF-8 string before the first NUL; `None` without a NUL.
fn c_string(b: &[u8]) -> Option<String> {
    let nul = b.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&b[..nul]).ok().map(str::to_string)
}

fn from_pairs(pairs: Vec<(String, Value)>) -> Result<ResumeToken, TokenError> {
    let mut t = ResumeToken::default();
    let (mut object, mut offset, mut bytes, mut toguid, mut toname) =
        (None, None, None, None, None);
    for (name, value) in pairs {
        let wrong = |want: &str| TokenError::Nvlist(format!("{name:?} is not a {want}"));
        match (name.as_str(), value) {
            ("object", Value::Uint64(v)) => object = Some(v),
            ("offset", Value::Uint64(v)) => offset = Some(v),
            ("bytes", Value::Uint64(v)) => bytes = Some(v),
            ("toguid", Value::Uint64(v)) => toguid = Some(v),
            ("fromguid", Value::Uint64(v)) => t.fromguid = Some(v),
            ("toname", Value::String(v)) => toname = Some(v),
            ("largeblockok", Value::Flag) => t.largeblockok = true,
            ("embedok", Value::Flag) => t.embedok = true,
            ("compressok", Value::Flag) => t.compressok = true,
            ("rawok", Value::Flag) => t.rawok = true,
            ("redact_snaps", Value::Uint64Array(v)) => t.redact_snaps = Some(v),
            ("book_redact_snaps", Value::Uint64Array(v)) => t.book_redact_snaps = Some(v),
            ("object" | "offset" | "bytes" | "toguid" | "fromguid", _) => {
                return Err(wrong("uint64"))
            }
            ("toname", _) => return Err(wrong("string")),
            ("largeblockok" | "embedok" | "compressok" | "rawok", _) => {
                return Err(wrong("boolean flag"))
            }
            ("redact_snaps" | "book_redact_snaps", _) => return Err(wrong("uint64 array")),
            (_, value) => t.other.push((name, value)),
        }
    }
    t.object = object.ok_or(TokenError::Missing("object"))?;
    t.offset = offset.ok_or(TokenError::Missing("offset"))?;
    t.bytes = bytes.ok_or(TokenError::Missing("bytes"))?;
    t.toguid = toguid.ok_or(TokenError::Missing("toguid"))?;
    t.toname = toname.ok_or(TokenError::Missing("toname"))?;
    if t.snapshot().is_none_or(str::is_empty) {
        return Err(TokenError::Nvlist(format!(
            "toname {:?} is not a snapshot name",
            t.toname
        )));
    }
    Ok(t)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    // Real tokens from the OpenZFS 2.3.2 test guest. ozs/tokfix@s1 (guid
    // 10045012655411321857 = 0x8b670dca12185c01) holds 3 MiB of random
    // data, @s2 (guid 11627777177197314544 = 0xa15e29bc6e3d81f0) 2 MiB more.

    /// `zfs send ozs/tokfix@s1 | head -c 1000000 | zfs receive -s ozt/tokfix;
    /// zfs get -H -o value receive_resume_token ozt/tokfix`
    pub(crate) const FULL: &str = "1-8d6b6018e-b8-789c636064000310a500c4ec50360710e72765a52697303030419460caa7a515a796806478e0f26c48f2499525a9c540ba43880fabfe92fcf4d2cc14203f4642e8146f7ab706923c27583e2f313715684f55b17e497e765a668543b121d42d009b46153a";

    /// `zfs send -c -i @s1 ozs/tokfix@s2 | head -c 700000 | zfs receive -s ozt/tokfix`
    pub(crate) const INCREMENTAL: &str = "1-dad37d1d4-100-789c636064000310a501c49c50360710a715e5e7a69766a6304001638c84d029def46e05209b1d495d7e52566a7209030333541d867c5a5a716a09039407916743924faa2c492d0649087061d55f920f71c58746dbbc3d9a710b3590e439c1f27989b9a9407baa8af54bf2b3d3322b1c8a8da0e670c3dc0ec4c9f9b90545a9c5c5f9d90c700000df0520b3";

    /// `zfs send -w ozs/tokfix@s1 | head -c 900000 | zfs receive -s ozt/tokfix`
    /// (raw on an unencrypted dataset: embedok and compressok, no rawok)
    const RAW_PLAIN: &str = "1-cd569b80c-f0-789c636064000310a500c4ec50360710e72765a52697303030419460caa7a515a7968064b8e0f26c48f2499525a9c5403a409007abfe92fcf4d2cc14203f4642e8146f7ab706923c27583e2f313715684f55b17e497e765a668543b121505c02aa1fe6eed4dca4d494fc6cb0f9dc48e2c9f9b90545a9c5c54029380000e2991c67";

    /// `zfs send -L -e ozs/tokfix@s2 | head -c 1500000 | zfs receive -s ozt/tokfix`
    const EMBED: &str = "1-ac34f7eee-d0-789c636064000310a500c4ec50360710e72765a52697303030419460caa7a515a796806444e0f26c48f2499525a9c5403a435c0cabfe92fcf4d2cc1406860f8db6797b34e3166a20c97382e5f312735381f65415eb97e467a7655638141b01c525a0fa61ee4ecd4d4a4dc9cf06f301302619d8";

    /// On an encrypted dataset (guid 0x150ad625893fc33f):
    /// `zfs send -w ozs/tokenc@e1 | head -c 600000 | zfs receive -s ozt/tokenc`
    const RAW_ENCRYPTED: &str = "1-ccaefe5d4-f0-789c636064000310a500c4ec50360710e72765a52697303030419460caa7a515a7968064d8e0f26c48f2499525a9c5407a8d080756fd25f9e9a599290c0cf687ed3b55af71896a20c97382e5f312735381f65415eb97e467a7e6253ba41a42cde16640b83b393fb7a028b5b8383f1b222601771144be28b11c26c5000051a11c7e";

    pub(crate) const S1: u64 = 0x8b670dca12185c01;
    pub(crate) const S2: u64 = 0xa15e29bc6e3d81f0;

    #[test]
    fn real_full_token_decodes() {
        // `zfs send -nvP -t` printed object 0x2, offset 0xc0000, bytes 0xe1288.
        let t = decode(FULL).unwrap();
        assert_eq!(
            t,
            ResumeToken {
                object: 2,
                offset: 0xc0000,
                bytes: 0xe1288,
                toguid: S1,
                toname: "ozs/tokfix@s1".into(),
                ..ResumeToken::default()
            }
        );
        assert_eq!(t.dataset(), "ozs/tokfix");
        assert_eq!(t.snapshot(), Some("s1"));
    }

    #[test]
    fn real_incremental_token_decodes() {
        let t = decode(INCREMENTAL).unwrap();
        assert_eq!(t.fromguid, Some(S1));
        assert_eq!(t.toguid, S2);
        assert_eq!(t.toname, "ozs/tokfix@s2");
        assert_eq!((t.object, t.offset, t.bytes), (3, 0x80000, 0xa1000));
        assert!(t.compressok && !t.embedok && !t.rawok && !t.largeblockok);
    }

    #[test]
    fn real_tokens_carry_their_stream_flags() {
        let t = decode(RAW_PLAIN).unwrap();
        assert!(t.embedok && t.compressok && !t.rawok);
        assert_eq!((t.bytes, t.toguid), (0xc1150, S1));
        let t = decode(EMBED).unwrap();
        assert!(t.embedok && !t.compressok && !t.rawok);
        assert_eq!((t.offset, t.bytes, t.toguid), (0x140000, 0x161768, S2));
        let t = decode(RAW_ENCRYPTED).unwrap();
        assert!(t.rawok && t.compressok && !t.embedok);
        assert_eq!(
            (t.toname.as_str(), t.toguid, t.bytes),
            ("ozs/tokenc@e1", 0x150ad625893fc33f, 0x814ac)
        );
        // Surrounding whitespace (as `zfs get` prints it) is fine.
        assert_eq!(decode(&format!("{FULL}\n")).unwrap(), decode(FULL).unwrap());
    }

    /// Builds a token around a packed nvlist, with a correct checksum.
    pub(crate) fn encode(packed: &[u8]) -> String {
        let compressed = miniz_oxide::deflate::compress_to_vec_zlib(packed, 6);
        let (le, _) = fletcher4_first_word(&compressed);
        let hex: String = compressed.iter().map(|b| format!("{b:02x}")).collect();
        format!("1-{le:x}-{:x}-{hex}", packed.len())
    }

    fn packed(token: &str) -> Vec<u8> {
        let payload = token.rsplit('-').next().unwrap();
        miniz_oxide::inflate::decompress_to_vec_zlib(&unhex(payload).unwrap()).unwrap()
    }

    fn err(token: &str) -> TokenError {
        decode(token).unwrap_err()
    }

    #[test]
    fn the_encoder_round_trips_real_tokens() {
        assert_eq!(decode(&encode(&packed(FULL))), decode(FULL));
    }

    #[test]
    fn corrupt_tokens_say_which_layer_is_broken() {
        let (_, rest) = FULL.split_once('-').unwrap();
        assert_eq!(err(&format!("2-{rest}")), TokenError::Version("2".into()));
        assert!(matches!(err("1-abc-def"), TokenError::Format(_)));
        assert!(matches!(err(""), TokenError::Format(_)));
        assert!(matches!(err(&format!("{FULL}-00")), TokenError::Format(_)));
        assert!(matches!(
            err(&FULL.replacen("-b8-", "-zz-", 1)),
            TokenError::Format(_)
        ));
        // One payload digit changed: the checksum catches it.
        let mut bad = FULL.to_string();
        let last = bad.pop().unwrap();
        bad.push(if last == '0' { '1' } else { '0' });
        assert!(matches!(err(&bad), TokenError::Checksum { .. }));
        // Odd length or a non-hex digit.
        assert_eq!(err(&FULL[..FULL.len() - 1]), TokenError::Hex);
        assert_eq!(
            err(&format!("{}g", &FULL[..FULL.len() - 1])),
            TokenError::Hex
        );
        // Declared length off by one.
        assert_eq!(
            err(&FULL.replacen("-b8-", "-b9-", 1)),
            TokenError::Length {
                declared: 0xb9,
                actual: 0xb8
            }
        );
        assert_eq!(
            err(&FULL.replacen("-b8-", "-ffffffff-", 1)),
            TokenError::DeclaredLength(0xffff_ffff)
        );
        // Not zlib at all, with a matching checksum.
        let junk = [0x12u8, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0];
        let (le, _) = fletcher4_first_word(&junk);
        assert_eq!(
            err(&format!("1-{le:x}-10-123456789abcdef0")),
            TokenError::Inflate
        );
        assert!(matches!(
            err(&"1".repeat(MAX_TOKEN_LEN + 1)),
            TokenError::TooLong(_)
        ));
        for e in [err(&bad), err("1-abc-def")] {
            assert!(!e.to_string().is_empty());
        }
    }

    /// A packed nvlist, little-endian native, from (name, type, elements, value).
    fn nvlist(pairs: &[(&str, i32, i32, &[u8])]) -> Vec<u8> {
        let mut out = vec![0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        for (name, kind, elements, value) in pairs {
            let name_len = name.len() + 1;
            let value_at = align8(NVPAIR_HEADER + name_len);
            let size = value_at + align8(value.len());
            out.extend((size as i32).to_le_bytes());
            out.extend((name_len as i16).to_le_bytes());
            out.extend([0, 0]);
            out.extend(elements.to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend(name.as_bytes());
            out.resize(out.len() + value_at - NVPAIR_HEADER - name.len(), 0);
            out.extend(*value);
            out.resize(out.len() + align8(value.len()) - value.len(), 0);
        }
        out.extend([0, 0, 0, 0]);
        out
    }

    fn u64v(v: u64) -> [u8; 8] {
        v.to_le_bytes()
    }

    #[test]
    fn the_fixture_builder_reproduces_the_kernels_bytes() {
        let want = packed(FULL);
        let got = nvlist(&[
            ("object", 8, 1, &u64v(2)),
            ("offset", 8, 1, &u64v(0xc0000)),
            ("bytes", 8, 1, &u64v(0xe1288)),
            ("toguid", 8, 1, &u64v(S1)),
            ("toname", 9, 1, b"ozs/tokfix@s1\0"),
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn missing_or_mistyped_fields_are_corrupt() {
        let base = |skip: &str| {
            let all: [(&str, i32, i32, &[u8]); 5] = [
                ("object", 8, 1, &u64v(2)),
                ("offset", 8, 1, &u64v(0)),
                ("bytes", 8, 1, &u64v(0)),
                ("toguid", 8, 1, &u64v(S1)),
                ("toname", 9, 1, b"p/d@s\0"),
            ];
            let kept: Vec<_> = all.into_iter().filter(|p| p.0 != skip).collect();
            encode(&nvlist(&kept))
        };
        assert!(decode(&base("")).is_ok());
        for field in ["object", "offset", "bytes", "toguid", "toname"] {
            assert_eq!(err(&base(field)), TokenError::Missing(field), "{field}");
        }
        let mistyped = encode(&nvlist(&[
            ("toguid", 9, 1, b"123\0"),
            ("toname", 9, 1, b"p/d@s\0"),
        ]));
        assert!(matches!(err(&mistyped), TokenError::Nvlist(m) if m.contains("toguid")));
        let not_a_snapshot = encode(&nvlist(&[
            ("object", 8, 1, &u64v(2)),
            ("offset", 8, 1, &u64v(0)),
            ("bytes", 8, 1, &u64v(0)),
            ("toguid", 8, 1, &u64v(S1)),
            ("toname", 9, 1, b"p/d\0"),
        ]));
        assert!(matches!(err(&not_a_snapshot), TokenError::Nvlist(_)));
        let twice = encode(&nvlist(&[("a", 1, 0, &[]), ("a", 1, 0, &[])]));
        assert!(matches!(err(&twice), TokenError::Nvlist(m) if m.contains("twice")));
        let nested = encode(&nvlist(&[("n", DATA_TYPE_NVLIST, 1, &[0; 24])]));
        assert!(matches!(err(&nested), TokenError::Nvlist(m) if m.contains("nested")));
        let mut xdr = packed(FULL);
        xdr[0] = 1;
        assert!(matches!(err(&encode(&xdr)), TokenError::Nvlist(m) if m.contains("XDR")));
    }

    #[test]
    fn unknown_pairs_and_redaction_lists_are_kept() {
        let snaps: Vec<u8> = [7u64, 8].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = decode(&encode(&nvlist(&[
            ("object", 8, 1, &u64v(2)),
            ("offset", 8, 1, &u64v(0)),
            ("bytes", 8, 1, &u64v(5)),
            ("toguid", 8, 1, &u64v(S1)),
            ("toname", 9, 1, b"p/d@s\0"),
            ("largeblockok", 1, 0, &[]),
            ("redact_snaps", 16, 2, &snaps),
            ("savedok", 1, 0, &[]),
            ("future", 6, 1, &[1, 0, 0, 0]),
        ])))
        .unwrap();
        assert!(t.largeblockok);
        assert_eq!(t.redact_snaps, Some(vec![7, 8]));
        assert_eq!(
            t.other,
            vec![
                ("savedok".to_string(), Value::Flag),
                (
                    "future".to_string(),
                    Value::Other {
                        kind: 6,
                        elements: 1,
                        raw: vec![1, 0, 0, 0, 0, 0, 0, 0]
                    }
                ),
            ]
        );
        // An array claiming more elements than its bytes hold.
        let lying = encode(&nvlist(&[("redact_snaps", 16, 1_000_000, &snaps)]));
        assert!(matches!(err(&lying), TokenError::Nvlist(_)));
    }

    #[test]
    fn big_endian_nvlists_decode() {
        let mut be = vec![0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        for (name, kind, value) in [
            ("object", 8i32, 2u64.to_be_bytes().to_vec()),
            ("offset", 8, 0u64.to_be_bytes().to_vec()),
            ("bytes", 8, 9u64.to_be_bytes().to_vec()),
            ("toguid", 8, S2.to_be_bytes().to_vec()),
            ("toname", 9, b"p/d@s\0\0\0".to_vec()),
        ] {
            let name_len = name.len() + 1;
            let value_at = align8(NVPAIR_HEADER + name_len);
            be.extend(((value_at + 8) as i32).to_be_bytes());
            be.extend((name_len as i16).to_be_bytes());
            be.extend([0, 0, 0, 0, 0, 1]);
            be.extend(kind.to_be_bytes());
            be.extend(name.as_bytes());
            be.resize(be.len() + value_at - NVPAIR_HEADER - name.len(), 0);
            be.extend(value);
        }
        be.extend([0, 0, 0, 0]);
        let t = decode(&encode(&be)).unwrap();
        assert_eq!((t.toguid, t.bytes, t.toname.as_str()), (S2, 9, "p/d@s"));
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn mutate(rng: &mut Rng, mut b: Vec<u8>, alphabet: &[u8]) -> Vec<u8> {
        for _ in 0..=rng.below(4) {
            match rng.below(5) {
                0 if !b.is_empty() => {
                    let i = rng.below(b.len());
                    b[i] = alphabet[rng.below(alphabet.len())];
                }
                1 if !b.is_empty() => {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                2 => b.truncate(rng.below(b.len() + 1)),
                3 => {
                    let i = rng.below(b.len() + 1);
                    b.insert(i, alphabet[rng.below(alphabet.len())]);
                }
                _ if !b.is_empty() => {
                    let i = rng.below(b.len());
                    b.remove(i);
                }
                _ => {}
            }
        }
        b
    }

    /// Mutated, truncated and random tokens never panic. Three layers are
    /// hit: the text (mostly stopped by the checksum), the zlib stream
    /// (checksum fixed up), and the nvlist (compressed and summed afresh).
    #[test]
    fn fuzzed_tokens_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let real = [FULL, INCREMENTAL, RAW_PLAIN, EMBED, RAW_ENCRYPTED];
        let all_bytes: Vec<u8> = (0..=255).collect();
        let mut decoded = 0;
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..6000 {
            let token = real[i % real.len()];
            let text = match i % 4 {
                0 => String::from_utf8_lossy(&mutate(
                    &mut rng,
                    token.as_bytes().to_vec(),
                    b"0123456789abcdef-xG ",
                ))
                .into_owned(),
                1 => {
                    let payload = token.rsplit('-').next().unwrap();
                    let mut z = mutate(&mut rng, unhex(payload).unwrap(), &all_bytes);
                    if z.is_empty() {
                        z.push(0);
                    }
                    let (le, _) = fletcher4_first_word(&z);
                    let hex: String = z.iter().map(|b| format!("{b:02x}")).collect();
                    let len = token.split('-').nth(2).unwrap();
                    format!("1-{le:x}-{len}-{hex}")
                }
                2 => {
                    let t = encode(&mutate(&mut rng, packed(token), &all_bytes));
                    if rng.below(4) > 0 {
                        t
                    } else {
                        // A valid stream of another length than declared.
                        let mut f: Vec<&str> = t.split('-').collect();
                        let len = format!("{:x}", rng.below(400));
                        f[2] = &len;
                        f.join("-")
                    }
                }
                _ => {
                    let n = rng.below(600);
                    let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    if rng.below(2) == 0 {
                        encode(&junk)
                    } else {
                        String::from_utf8_lossy(&junk).into_owned()
                    }
                }
            };
            match decode(&text) {
                Ok(t) => {
                    decoded += 1;
                    assert!(!t.toname.is_empty());
                }
                Err(e) => {
                    let layer = format!("{e:?}");
                    let layer = layer.split(['(', ' ']).next().unwrap_or("").to_string();
                    *seen.entry(layer).or_insert(0) += 1;
                }
            }
        }
        // Some nvlist mutations (e.g. in a name's padding) still decode;
        // every layer was reached and refused something.
        assert!(decoded < 6000);
        for layer in [
            "Format", "Hex", "Checksum", "Inflate", "Length", "Nvlist", "Missing",
        ] {
            assert!(
                seen.get(layer).is_some_and(|n| *n > 10),
                "{layer}: {seen:?}"
            );
        }
    }
}
