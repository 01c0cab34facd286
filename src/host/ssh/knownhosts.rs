//! Host keys and key files, read the way OpenSSH reads them, without I/O of
//! their own: `known_hosts` matching (plain, wildcard, `[host]:port` and
//! hashed `|1|` entries, `@revoked`), fingerprints, the OpenSSH line for a
//! newly accepted key, whether a private key file is encrypted, and the
//! small base64/SHA-1/HMAC helpers that needs. `auth.rs` reads the files and
//! decides what to do with a verdict.

use super::sshconfig::match_pattern_list;

// ---------------------------------------------------------------------------
// known_hosts

/// The result of looking a presented host key up in known_hosts files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyVerdict {
    /// An entry for this host holds exactly this key.
    Known,
    /// Entries for this host hold a different key of the same type
    /// (`where_` names the first one as "file:line").
    Changed { where_: String },
    /// No entry for this host has a key of this type.
    Unknown,
    /// The key is marked `@revoked` ("file:line").
    Revoked { where_: String },
}

/// One known_hosts file's text with its path (for messages).
pub struct KnownHostsFile<'a> {
    pub path: &'a str,
    pub text: &'a str,
}

/// The name known_hosts uses for a host: `host` on port 22, `[host]:port`
/// otherwise (OpenSSH looks up only this form).
pub fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

struct KnownEntry {
    revoked: bool,
    key: Vec<u8>,
    where_: String,
}

/// The entries in `files` whose host field matches `name` (plain patterns or
/// hashed), skipping `@cert-authority` lines and lines that do not parse.
fn entries_for(files: &[KnownHostsFile<'_>], name: &str) -> Vec<KnownEntry> {
    let name = name.to_ascii_lowercase();
    let mut entries = Vec::new();
    for file in files {
        for (index, line) in file.text.lines().enumerate() {
            let mut fields = line.split_whitespace();
            let Some(mut hosts) = fields.next() else {
                continue;
            };
            if hosts.starts_with('#') {
                continue;
            }
            let mut revoked = false;
            if hosts.starts_with('@') {
                match hosts {
                    "@revoked" => revoked = true,
                    _ => continue,
                }
                let Some(next) = fields.next() else {
                    continue;
                };
                hosts = next;
            }
            let (Some(_key_type), Some(key_b64)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some(key) = base64_decode(key_b64) else {
                continue;
            };
            if host_field_matches(hosts, &name) {
                entries.push(KnownEntry {
                    revoked,
                    key,
                    where_: format!("{}:{}", file.path, index + 1),
                });
            }
        }
    }
    entries
}

fn host_field_matches(field: &str, name: &str) -> bool {
    if let Some(hashed) = field.strip_prefix("|1|") {
        let Some((salt, hash)) = hashed.split_once('|') else {
            return false;
        };
        return match (base64_decode(salt), base64_decode(hash)) {
            (Some(salt), Some(hash)) => hmac_sha1(&salt, name.as_bytes()).as_slice() == hash,
            _ => false,
        };
    }
    let patterns: Vec<String> = field.split(',').map(str::to_string).collect();
    match_pattern_list(name, &patterns) == Some(true)
}

/// The key type name inside an SSH public key blob ("ssh-ed25519", ...).
pub fn key_type_of_blob(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(blob.get(4..4 + len)?).ok()
}

/// Check the key `blob` that a host presented against known_hosts `files`,
/// as OpenSSH would. `name` is what the files record it under: its
/// [`known_hosts_name`], or its HostKeyAlias.
pub fn check_host_key(files: &[KnownHostsFile<'_>], name: &str, blob: &[u8]) -> HostKeyVerdict {
    let entries = entries_for(files, name);
    if let Some(bad) = entries.iter().find(|e| e.revoked && e.key == blob) {
        return HostKeyVerdict::Revoked {
            where_: bad.where_.clone(),
        };
    }
    let presented_type = key_type_of_blob(blob);
    let same_type: Vec<&KnownEntry> = entries
        .iter()
        .filter(|e| !e.revoked && key_type_of_blob(&e.key) == presented_type)
        .collect();
    if same_type.iter().any(|e| e.key == blob) {
        HostKeyVerdict::Known
    } else if let Some(first) = same_type.first() {
        HostKeyVerdict::Changed {
            where_: first.where_.clone(),
        }
    } else {
        HostKeyVerdict::Unknown
    }
}

/// Key types (blob type names) already known for the host, in file order,
/// so the handshake can prefer them the way OpenSSH does.
/// `name` as for [`check_host_key`].
pub fn known_key_types(files: &[KnownHostsFile<'_>], name: &str) -> Vec<String> {
    let mut types: Vec<String> = Vec::new();
    for entry in entries_for(files, name) {
        if let Some(t) = key_type_of_blob(&entry.key) {
            if !entry.revoked && !types.iter().any(|k| k == t) {
                types.push(t.to_string());
            }
        }
    }
    types
}

/// The known_hosts line OpenSSH would append for a new key recorded under
/// `name` (as for [`check_host_key`]).
pub fn known_hosts_line(name: &str, blob: &[u8]) -> Option<String> {
    let key_type = key_type_of_blob(blob)?;
    Some(format!(
        "{} {} {}\n",
        name,
        key_type,
        base64_encode(blob, true)
    ))
}

/// OpenSSH's fingerprint text for a SHA-256 digest: "SHA256:" and unpadded
/// base64.
pub fn sha256_fingerprint(digest: &[u8]) -> String {
    format!("SHA256:{}", base64_encode(digest, false))
}

/// A short key type for messages: "ED25519", "ECDSA", "RSA", "DSA".
pub fn key_type_label(key_type: &str) -> String {
    match key_type {
        "ssh-ed25519" => "ED25519".into(),
        "ssh-rsa" => "RSA".into(),
        "ssh-dss" => "DSA".into(),
        t if t.starts_with("ecdsa-sha2-") => "ECDSA".into(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------
// private keys

/// Whether a private key file's text says it is passphrase-protected
/// (OpenSSH format with a cipher other than "none", or encrypted PEM), or a
/// one-line reason why its OpenSSH armour is malformed (no END after the
/// BEGIN, a body that is not base64 or lacks the format's magic).
pub fn private_key_is_encrypted(text: &str) -> Result<bool, String> {
    if text.contains("ENCRYPTED") {
        return Ok(true);
    }
    let begin = "-----BEGIN OPENSSH PRIVATE KEY-----";
    let end = "-----END OPENSSH PRIVATE KEY-----";
    let Some(start) = text.find(begin) else {
        return Ok(false);
    };
    let after = &text[start + begin.len()..];
    let Some(stop) = after.find(end) else {
        return Err("malformed OpenSSH private key: no END line after its BEGIN line".into());
    };
    let body: String = after[..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let raw =
        base64_decode(&body).ok_or("malformed OpenSSH private key: its body is not base64")?;
    let magic = b"openssh-key-v1\0";
    let rest = raw
        .strip_prefix(magic.as_slice())
        .ok_or("malformed OpenSSH private key: not in openssh-key-v1 format")?;
    Ok(key_type_of_blob(rest).is_some_and(|cipher| cipher != "none"))
}

// ---------------------------------------------------------------------------
// base64 and HMAC-SHA1 (for hashed known_hosts names)

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut message = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_be_bytes());
    for block in message.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

fn hmac_sha1(key: &[u8], message: &[u8]) -> [u8; 20] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..20].copy_from_slice(&sha1(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(message);
    let mut outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha1(&inner));
    sha1(&outer)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Blobs as ssh-keygen writes them (keys made for these tests).
    const ED_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIPmm9KAKinPbhuBVdKSvx934RNujIH6LsKup1K6vnWsG";
    const ED_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIHiD1HWOXk5VDyTvPiyInpDv/3sObNoM4vMKIK55zgWh";
    const ECDSA: &str = "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBFYgThkbwmRNsPZcNEhjp3TYOCJnp9yoNYqO84ip9/Io7qYvh4FhLGEJshV9Y3V4ECq7lsRYHf78rUQvNSdEOvY=";

    fn blob(b64: &str) -> Vec<u8> {
        base64_decode(b64).unwrap()
    }

    fn verdict(text: &str, host: &str, port: u16, key: &str) -> HostKeyVerdict {
        let files = [KnownHostsFile { path: "kh", text }];
        check_host_key(&files, &known_hosts_name(host, port), &blob(key))
    }

    #[test]
    fn plain_entries_match_by_host_and_key() {
        let kh = format!("# comment\nnas,10.213.0.3 ssh-ed25519 {ED_A}\n");
        assert_eq!(verdict(&kh, "10.213.0.3", 22, ED_A), HostKeyVerdict::Known);
        assert_eq!(
            verdict(&kh, "10.213.0.3", 22, ED_B),
            HostKeyVerdict::Changed {
                where_: "kh:2".into()
            }
        );
        assert_eq!(
            verdict(&kh, "10.213.0.4", 22, ED_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn other_ports_use_bracket_form_only() {
        let kh = format!("[127.0.0.1]:2299 ssh-ed25519 {ED_A}\n127.0.0.1 ssh-ed25519 {ED_B}\n");
        assert_eq!(verdict(&kh, "127.0.0.1", 2299, ED_A), HostKeyVerdict::Known);
        assert_eq!(verdict(&kh, "127.0.0.1", 22, ED_B), HostKeyVerdict::Known);
        assert_eq!(
            verdict(&kh, "127.0.0.1", 2300, ED_B),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn a_key_of_another_type_is_unknown_not_changed() {
        let kh = format!("nas ecdsa-sha2-nistp256 {ECDSA}\n");
        assert_eq!(verdict(&kh, "nas", 22, ED_A), HostKeyVerdict::Unknown);
        let files = [KnownHostsFile {
            path: "kh",
            text: &kh,
        }];
        assert_eq!(known_key_types(&files, "nas"), vec!["ecdsa-sha2-nistp256"]);
    }

    #[test]
    fn hashed_entries_match() {
        // From `ssh-keygen -H` on "10.213.0.3 ssh-ed25519 ED_A" and
        // "[127.0.0.1]:2299 ssh-ed25519 ED_A".
        let kh = format!(
            "|1|2V1dTOZBwy83cZw+Pw1S+E+zReo=|3nBjFatTkPItQmQrUCuwUJ5I4Ng= ssh-ed25519 {ED_A}\n\
             |1|vtq+iU0H6pf3/d33b7kuqZp6mPo=|b/aghNfkjdi27z6sRfdWGQIQNH4= ssh-ed25519 {ED_A}\n"
        );
        assert_eq!(verdict(&kh, "10.213.0.3", 22, ED_A), HostKeyVerdict::Known);
        assert_eq!(verdict(&kh, "127.0.0.1", 2299, ED_A), HostKeyVerdict::Known);
        assert_eq!(
            verdict(&kh, "10.213.0.3", 22, ED_B),
            HostKeyVerdict::Changed {
                where_: "kh:1".into()
            }
        );
        assert_eq!(
            verdict(&kh, "10.213.0.4", 22, ED_A),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn wildcard_negation_revoked_and_cert_authority_lines() {
        let kh = format!(
            "10.213.0.*,!10.213.0.9 ssh-ed25519 {ED_A}\n\
             @cert-authority * ssh-ed25519 {ED_B}\n\
             @revoked * ssh-ed25519 {ED_B}\n"
        );
        assert_eq!(verdict(&kh, "10.213.0.5", 22, ED_A), HostKeyVerdict::Known);
        assert_eq!(
            verdict(&kh, "10.213.0.9", 22, ED_A),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            verdict(&kh, "10.213.0.5", 22, ED_B),
            HostKeyVerdict::Revoked {
                where_: "kh:3".into()
            }
        );
    }

    #[test]
    fn new_host_line_is_openssh_format() {
        assert_eq!(
            known_hosts_line(&known_hosts_name("127.0.0.1", 2299), &blob(ED_A)).unwrap(),
            format!("[127.0.0.1]:2299 ssh-ed25519 {ED_A}\n")
        );
        assert_eq!(
            known_hosts_line("nas", &blob(ED_A)).unwrap(),
            format!("nas ssh-ed25519 {ED_A}\n")
        );
    }

    #[test]
    fn base64_round_trips_and_fingerprint_is_unpadded() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&data, true)).unwrap(), data);
            assert_eq!(base64_decode(&base64_encode(&data, false)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"ab", true), "YWI=");
        assert_eq!(sha256_fingerprint(b"ab"), "SHA256:YWI");
        assert!(base64_decode("a$b").is_none());
    }

    #[test]
    fn sha1_and_hmac_match_published_vectors() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // RFC 2202 test cases 1 and 2.
        assert_eq!(
            hex(&hmac_sha1(&[0x0b; 20], b"Hi There")),
            "b617318655057264e28bc0b6fb378c8ef146be00"
        );
        assert_eq!(
            hex(&hmac_sha1(b"Jefe", b"what do ya want for nothing?")),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }

    #[test]
    fn encrypted_private_keys_are_recognised() {
        // Headers of `ssh-keygen -t ed25519 -N ''` and `-N secret` keys.
        let plain = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
            b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n\
            -----END OPENSSH PRIVATE KEY-----\n";
        let locked = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
            b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABALinLxsN\n\
            -----END OPENSSH PRIVATE KEY-----\n";
        assert_eq!(private_key_is_encrypted(plain), Ok(false));
        assert_eq!(private_key_is_encrypted(locked), Ok(true));
        assert_eq!(
            private_key_is_encrypted("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"),
            Ok(true)
        );
    }

    #[test]
    fn a_malformed_private_key_is_a_one_line_error_not_a_panic() {
        // END before BEGIN used to slice text[start..stop] backwards.
        let swapped = "-----END OPENSSH PRIVATE KEY-----\n\
            b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n\
            -----BEGIN OPENSSH PRIVATE KEY-----\n";
        let err = private_key_is_encrypted(swapped).unwrap_err();
        assert_eq!(
            err,
            "malformed OpenSSH private key: no END line after its BEGIN line"
        );
        let garbage =
            "-----BEGIN OPENSSH PRIVATE KEY-----\n!!!\n-----END OPENSSH PRIVATE KEY-----\n";
        assert!(private_key_is_encrypted(garbage)
            .unwrap_err()
            .contains("not base64"));
        let not_v1 =
            "-----BEGIN OPENSSH PRIVATE KEY-----\naGVsbG8=\n-----END OPENSSH PRIVATE KEY-----\n";
        assert!(!private_key_is_encrypted(not_v1).unwrap_err().contains('\n'));
        assert_eq!(private_key_is_encrypted("just text"), Ok(false));
    }
}
