//! Validation of the seed inputs that leave JSON strings inside the guest: the instance id
//! (a directory name), the hostname, the login user (an account name), SSH keys (lines of
//! `authorized_keys`) and MACs (interface matches). Pure predicates; each error message names
//! the field and shows the offending value escaped and truncated, so it is safe to log and to
//! return to the user.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

use super::SeedError;

const MAX_INSTANCE_ID_CHARS: usize = 128;
const MAX_HOSTNAME_CHARS: usize = 63;
/// Linux `useradd` refuses longer names.
const MAX_USER_CHARS: usize = 32;
/// An RSA-16384 key line is about 2.8 KiB; anything much longer is not a key.
const MAX_SSH_KEY_BYTES: usize = 8 * 1024;

/// Accounts that already exist in every image (so `useradd` would fail and the keys would never
/// land) or that cloud-init gives a special meaning (`default`).
const RESERVED_USERS: &[&str] = &[
    "root",
    "default",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "nobody",
    "sshd",
    "messagebus",
    "systemd-network",
    "systemd-resolve",
    "systemd-timesync",
    "_apt",
    "polkitd",
];

/// Key types cloud-init and OpenSSH accept that vmhost passes on.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// `ssh-keygen` pads its base64; other tools sometimes strip the padding. Both mean the same key.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The value as it may appear in an error message: escaped (no raw newlines reach a log line or
/// an HTTP body) and cut to a readable length.
pub(crate) fn shown(value: &str) -> String {
    const MAX: usize = 64;
    if value.chars().count() <= MAX {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(MAX).collect();
        format!("{head:?}…")
    }
}

fn invalid(msg: String) -> SeedError {
    SeedError::Invalid(msg)
}

/// `instance-id` is a directory name under `/var/lib/cloud/instances/`, so no `/`, no `.`/`..`.
pub(crate) fn instance_id(id: &str) -> Result<(), SeedError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let starts_alnum = id.starts_with(|c: char| c.is_ascii_alphanumeric());
    if id.len() > MAX_INSTANCE_ID_CHARS || !starts_alnum || !id.chars().all(ok_char) {
        return Err(invalid(format!(
            "instance id {} must be 1-{MAX_INSTANCE_ID_CHARS} characters of [A-Za-z0-9._-] \
             starting with a letter or digit",
            shown(id)
        )));
    }
    Ok(())
}

/// An RFC 1123 label in lowercase: the guest's `/etc/hostname`.
pub(crate) fn hostname(name: &str) -> Result<(), SeedError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty()
        || name.len() > MAX_HOSTNAME_CHARS
        || !name.chars().all(ok_char)
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(invalid(format!(
            "hostname {} must be 1-{MAX_HOSTNAME_CHARS} characters of [a-z0-9-], \
             not starting or ending with '-'",
            shown(name)
        )));
    }
    Ok(())
}

/// The portable subset `useradd` accepts everywhere: `[a-z_][a-z0-9_-]*`, at most 32 characters.
pub(crate) fn login_user(name: &str) -> Result<(), SeedError> {
    let first_ok = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
    if name.len() > MAX_USER_CHARS || !first_ok || !rest_ok {
        return Err(invalid(format!(
            "login user {} must be 1-{MAX_USER_CHARS} characters of [a-z0-9_-] \
             starting with a letter or '_'",
            shown(name)
        )));
    }
    if RESERVED_USERS.contains(&name) {
        return Err(invalid(format!(
            "login user {} is a system account or a cloud-init keyword",
            shown(name)
        )));
    }
    Ok(())
}

/// Checks one `authorized_keys` line and returns it normalised to `<type> <base64>[ <comment>]`.
///
/// Options (`command="…"`, `from=…`) are refused: they are not part of a public key, and vmhost
/// would otherwise pass on restrictions or commands it never looked at.
pub(crate) fn ssh_key(line: &str) -> Result<String, SeedError> {
    let bad = |why: &str| invalid(format!("ssh key {}: {why}", shown(line)));
    if line.len() > MAX_SSH_KEY_BYTES {
        return Err(bad("longer than 8 KiB"));
    }
    if line.contains(['\n', '\r']) {
        return Err(bad("must be a single line"));
    }
    let line = line.trim_matches([' ', '\t']);
    let (key_type, rest) = line
        .split_once([' ', '\t'])
        .ok_or_else(|| bad("expected `<type> <base64> [comment]`"))?;
    let rest = rest.trim_start_matches([' ', '\t']);
    let (blob_b64, comment) = match rest.split_once([' ', '\t']) {
        Some((blob, comment)) => (blob, comment.trim_matches([' ', '\t'])),
        None => (rest, ""),
    };
    if !SSH_KEY_TYPES.contains(&key_type) {
        return Err(bad(&format!(
            "unknown key type; expected one of {}",
            SSH_KEY_TYPES.join(", ")
        )));
    }
    if comment.chars().any(char::is_control) {
        return Err(bad("comment contains control characters"));
    }
    let blob = BASE64
        .decode(blob_b64)
        .map_err(|_| bad("key data is not valid base64"))?;
    check_key_blob(key_type, &blob).map_err(bad)?;

    let mut normalised = format!("{key_type} {blob_b64}");
    if !comment.is_empty() {
        normalised.push(' ');
        normalised.push_str(comment);
    }
    Ok(normalised)
}

/// Checks the SSH wire encoding (RFC 4253 §6.6 and the OpenSSH `PROTOCOL.u2f` extensions): a
/// sequence of length-prefixed strings whose first is the key type, with the field count and
/// sizes each type has. This catches a key pasted under the wrong type or truncated in transit.
fn check_key_blob(key_type: &str, blob: &[u8]) -> Result<(), &'static str> {
    let fields = wire_strings(blob).ok_or("key data is truncated or malformed")?;
    if fields.first().copied() != Some(key_type.as_bytes()) {
        return Err("key data is for a different key type than the line declares");
    }
    let curve = key_type.strip_prefix("ecdsa-sha2-").or_else(|| {
        key_type
            .strip_prefix("sk-ecdsa-sha2-")
            .and_then(|t| t.strip_suffix("@openssh.com"))
    });
    let well_formed = match (key_type, fields.as_slice()) {
        ("ssh-ed25519", [_, pk]) => pk.len() == 32,
        ("sk-ssh-ed25519@openssh.com", [_, pk, _application]) => pk.len() == 32,
        ("ssh-rsa", [_, e, n]) => !e.is_empty() && n.len() >= 128,
        (t, [_, c, q]) if t.starts_with("ecdsa-") => {
            Some(*c) == curve.map(str::as_bytes) && !q.is_empty()
        }
        (t, [_, c, q, _application]) if t.starts_with("sk-ecdsa-") => {
            Some(*c) == curve.map(str::as_bytes) && !q.is_empty()
        }
        _ => false,
    };
    if well_formed {
        Ok(())
    } else {
        Err("key data does not have the structure of its key type")
    }
}

/// Splits `blob` into SSH `string`s (u32 big-endian length, then bytes); `None` if it does not
/// divide exactly.
fn wire_strings(mut blob: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !blob.is_empty() {
        let (len, rest) = blob.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (field, rest) = rest.split_at(len);
        out.push(field);
        blob = rest;
    }
    Some(out)
}

/// A MAC as libvirt writes it: six lowercase hex pairs, unicast, not all zero.
pub(crate) fn mac(mac: &str) -> Result<[u8; 6], SeedError> {
    let bad = |why: &str| invalid(format!("MAC address {}: {why}", shown(mac)));
    let parts: Vec<&str> = mac.split(':').collect();
    let well_formed = parts.len() == 6
        && parts.iter().all(|p| {
            p.len() == 2
                && p.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        });
    if !well_formed {
        return Err(bad(
            "expected six lowercase hex pairs like 52:54:00:12:ab:cd",
        ));
    }
    let mut octets = [0u8; 6];
    for (octet, part) in octets.iter_mut().zip(&parts) {
        *octet = u8::from_str_radix(part, 16).map_err(|_| bad("not hexadecimal"))?;
    }
    if octets[0] & 1 == 1 {
        return Err(bad("is a multicast address"));
    }
    if octets == [0; 6] {
        return Err(bad("is all zero"));
    }
    Ok(octets)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encodes fields as SSH wire strings, then base64: builds keys of any shape for tests.
    pub(crate) fn key_b64(fields: &[&[u8]]) -> String {
        let mut blob = Vec::new();
        for f in fields {
            blob.extend_from_slice(&u32::try_from(f.len()).unwrap().to_be_bytes());
            blob.extend_from_slice(f);
        }
        base64::engine::general_purpose::STANDARD.encode(blob)
    }

    pub(crate) fn ed25519(comment: &str) -> String {
        let b64 = key_b64(&[b"ssh-ed25519", &[7u8; 32]]);
        if comment.is_empty() {
            format!("ssh-ed25519 {b64}")
        } else {
            format!("ssh-ed25519 {b64} {comment}")
        }
    }

    #[track_caller]
    fn assert_invalid<T: std::fmt::Debug>(result: Result<T, SeedError>, needle: &str) {
        match result {
            Err(SeedError::Invalid(msg)) => {
                assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}")
            }
            other => panic!("expected Invalid containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn instance_ids() {
        for ok in ["job-0b5b6a2e", "i.1_2-3", "A"] {
            instance_id(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "-x",
            "job 1",
            "é",
            &"a".repeat(129),
        ] {
            assert_invalid(instance_id(bad), "instance id");
        }
    }

    #[test]
    fn hostnames() {
        for ok in ["job1", "a", "0", "my-vm-7", &"a".repeat(63)] {
            hostname(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Job1",
            "a.b",
            "a_b",
            "a b",
            "a\nb",
            "vm\n  - runcmd:",
            "é",
            &"a".repeat(64),
        ] {
            assert_invalid(hostname(bad), "hostname");
        }
    }

    #[test]
    fn login_users() {
        for ok in ["ops", "_svc", "u-1", "ucloud", &"a".repeat(32)] {
            login_user(ok).unwrap();
        }
        for bad in [
            "",
            "1ops",
            "-ops",
            "Ops",
            "o.ps",
            "o ps",
            "ops\n",
            "ops$",
            &"a".repeat(33),
        ] {
            assert_invalid(login_user(bad), "login user");
        }
        assert_invalid(login_user("root"), "system account");
        assert_invalid(login_user("default"), "cloud-init keyword");
    }

    #[test]
    fn ssh_keys_are_normalised() {
        let b64 = key_b64(&[b"ssh-ed25519", &[7u8; 32]]);
        assert_eq!(
            ssh_key(&format!("  ssh-ed25519\t{b64}   me@host  ")).unwrap(),
            format!("ssh-ed25519 {b64} me@host")
        );
        assert_eq!(
            ssh_key(&format!("ssh-ed25519 {b64}")).unwrap(),
            format!("ssh-ed25519 {b64}")
        );
        let spaced = format!("ssh-ed25519 {b64} Jürgen's laptop (work)");
        assert_eq!(ssh_key(&spaced).unwrap(), spaced);
        let unpadded = b64.trim_end_matches('=');
        ssh_key(&format!("ssh-ed25519 {unpadded}")).unwrap();
    }

    #[test]
    fn every_key_type_is_accepted_with_its_structure() {
        let long = [1u8; 257];
        let cases: Vec<(&str, Vec<&[u8]>)> = vec![
            ("ssh-ed25519", vec![b"ssh-ed25519", &[1; 32]]),
            ("ssh-rsa", vec![b"ssh-rsa", &[1, 0, 1], &long]),
            (
                "ecdsa-sha2-nistp256",
                vec![b"ecdsa-sha2-nistp256", b"nistp256", &[4; 65]],
            ),
            (
                "ecdsa-sha2-nistp384",
                vec![b"ecdsa-sha2-nistp384", b"nistp384", &[4; 97]],
            ),
            (
                "ecdsa-sha2-nistp521",
                vec![b"ecdsa-sha2-nistp521", b"nistp521", &[4; 133]],
            ),
            (
                "sk-ssh-ed25519@openssh.com",
                vec![b"sk-ssh-ed25519@openssh.com", &[1; 32], b"ssh:"],
            ),
            (
                "sk-ecdsa-sha2-nistp256@openssh.com",
                vec![
                    b"sk-ecdsa-sha2-nistp256@openssh.com",
                    b"nistp256",
                    &[4; 65],
                    b"ssh:",
                ],
            ),
        ];
        for (ty, fields) in cases {
            let line = format!("{ty} {} c", key_b64(&fields));
            assert_eq!(ssh_key(&line).unwrap(), line);
        }
    }

    #[test]
    fn bad_ssh_keys() {
        let good = key_b64(&[b"ssh-ed25519", &[7u8; 32]]);
        assert_invalid(ssh_key(""), "expected `<type> <base64> [comment]`");
        assert_invalid(
            ssh_key("ssh-ed25519"),
            "expected `<type> <base64> [comment]`",
        );
        assert_invalid(ssh_key(&format!("ssh-dss {good}")), "unknown key type");
        assert_invalid(
            ssh_key(&format!("command=\"rm -rf /\" ssh-ed25519 {good}")),
            "unknown key type",
        );
        assert_invalid(ssh_key("ssh-ed25519 not*base64"), "not valid base64");
        assert_invalid(
            ssh_key(&format!("ssh-ed25519 {good} a\nssh-rsa AAAA b")),
            "single line",
        );
        assert_invalid(ssh_key(&format!("ssh-ed25519 {good}\r")), "single line");
        assert_invalid(
            ssh_key(&format!("ssh-ed25519 {good} a\u{7}b")),
            "control characters",
        );
        assert_invalid(
            ssh_key(&format!("ssh-ed25519 {good} {}", "c".repeat(9000))),
            "8 KiB",
        );
        // Declared type and embedded type disagree.
        assert_invalid(ssh_key(&format!("ssh-rsa {good}")), "different key type");
        // Truncated blob, wrong key length, wrong curve, trailing garbage.
        let truncated = &good[..good.len() - 8];
        assert_invalid(ssh_key(&format!("ssh-ed25519 {truncated}")), "ssh key");
        let short = key_b64(&[b"ssh-ed25519", &[7u8; 31]]);
        assert_invalid(ssh_key(&format!("ssh-ed25519 {short}")), "structure");
        let curve = key_b64(&[b"ecdsa-sha2-nistp256", b"nistp384", &[4; 65]]);
        assert_invalid(
            ssh_key(&format!("ecdsa-sha2-nistp256 {curve}")),
            "structure",
        );
        let extra = key_b64(&[b"ssh-ed25519", &[7u8; 32], b"more"]);
        assert_invalid(ssh_key(&format!("ssh-ed25519 {extra}")), "structure");
    }

    #[test]
    fn macs() {
        assert_eq!(
            mac("52:54:00:aa:bb:01").unwrap(),
            [0x52, 0x54, 0, 0xaa, 0xbb, 1]
        );
        mac("02:00:00:00:00:01").unwrap();
        for bad in [
            "",
            "52:54:00:AA:BB:01",
            "52-54-00-aa-bb-01",
            "52:54:00:aa:bb",
            "52:54:00:aa:bb:01:02",
            "52:54:00:aa:bb:1",
            "52:54:00:aa:bb:0g",
            "525400aabb01",
            "52:54:00:aa:bb:01\n",
        ] {
            assert_invalid(mac(bad), "lowercase hex");
        }
        assert_invalid(mac("01:00:5e:00:00:01"), "multicast");
        assert_invalid(mac("00:00:00:00:00:00"), "all zero");
    }

    #[test]
    fn shown_escapes_and_truncates() {
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        assert!(shown(&"x".repeat(100)).ends_with('…'));
    }
}
