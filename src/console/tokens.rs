//! One-time console session tokens, and the `Origin` check of console upgrade requests.
//!
//! A token is what a browser shows to open a console: UCloud gets it from `interactiveSession`
//! inside a URL, and the browser presents it on the WebSocket upgrade (browsers cannot send an
//! `Authorization` header there). So a token is:
//! - **unguessable**: 32 bytes from the OS's CSPRNG, URL-safe base64 (43 characters);
//! - **stored hashed**: the table holds SHA-256 digests only. A memory dump or a `Debug` print
//!   gives nothing to replay, and lookups go by digest, so timing reveals nothing about how much
//!   of a guessed token was right;
//! - **single use**: [`SessionTokens::redeem`] removes it, whatever the outcome, so a refused
//!   attempt (wrong kind) also burns it;
//! - **short-lived**: the TTL bounds the time to *connect*. An expired token is remembered for
//!   [`EXPIRED_MEMORY`] more so the page can say "this link expired" ([`TokenError::Expired`])
//!   rather than "unknown" ([`TokenError::Unknown`]); after that it is purged. Purging is lazy,
//!   at most every [`PURGE_EVERY`], during `issue` and `redeem`.
//!
//! Concurrency: one `std::sync::Mutex` around the table, held for a hash-map operation only,
//! never across an `.await`. Time is `tokio::time::Instant`, so tests run on a paused clock.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// Anything longer is not one of ours and is refused before hashing.
const MAX_TOKEN_CHARS: usize = 128;
/// How long an expired token is still recognised as expired.
pub const EXPIRED_MEMORY: Duration = Duration::from_secs(10 * 60);
/// Least time between two purges of expired entries.
pub const PURGE_EVERY: Duration = Duration::from_secs(30);
/// Bound on the table; past it the entry that expires first is dropped to make room.
const MAX_ENTRIES: usize = 100_000;

/// Which console a token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionKind {
    Vnc,
    Shell,
}

impl fmt::Display for SessionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SessionKind::Vnc => "VNC",
            SessionKind::Shell => "shell",
        })
    }
}

/// What a redeemed token entitles its bearer to: one console of one VM of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub job_id: String,
    pub rank: u32,
    /// The UCloud user the session was opened for.
    pub user: String,
    pub kind: SessionKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Never issued, already used, or expired so long ago that it was purged.
    #[error("unknown or already used console token")]
    Unknown,
    #[error("the console token has expired")]
    Expired,
    #[error("the console token opens a {issued} console, not a {wanted} console")]
    WrongKind {
        wanted: SessionKind,
        issued: SessionKind,
    },
}

/// The table of outstanding tokens. Share it behind an `Arc`.
pub struct SessionTokens {
    ttl: Duration,
    /// Only ever locked for a single map operation (see the module docs).
    inner: Mutex<Table>,
}

struct Table {
    /// SHA-256 of the token → what it grants.
    entries: HashMap<[u8; 32], Entry>,
    next_purge: Instant,
}

struct Entry {
    grant: Grant,
    expires: Instant,
}

impl fmt::Debug for SessionTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionTokens")
            .field("ttl", &self.ttl)
            .field("outstanding", &self.len())
            .finish_non_exhaustive()
    }
}

impl SessionTokens {
    /// A sensible time to connect: the browser opens the console right after UCloud hands it
    /// the URL.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

    /// A table whose tokens must be redeemed within `ttl` of being issued.
    pub fn new(ttl: Duration) -> SessionTokens {
        SessionTokens {
            ttl,
            inner: Mutex::new(Table {
                entries: HashMap::new(),
                next_purge: Instant::now() + PURGE_EVERY,
            }),
        }
    }

    /// Issues a token for `grant`; only its digest is kept.
    pub fn issue(&self, grant: Grant) -> String {
        let mut raw = [0u8; TOKEN_BYTES];
        OsRng.fill_bytes(&mut raw);
        let token = URL_SAFE_NO_PAD.encode(raw);
        let now = Instant::now();
        let mut table = self.table();
        table.purge_if_due(now);
        if table.entries.len() >= MAX_ENTRIES {
            table.purge(now);
            table.evict_first_to_expire();
        }
        table.entries.insert(
            digest(&token),
            Entry {
                grant,
                expires: now + self.ttl,
            },
        );
        token
    }

    /// Redeems `token` for a console of `kind`. The token is gone afterwards, whatever the
    /// result.
    pub fn redeem(&self, token: &str, kind: SessionKind) -> Result<Grant, TokenError> {
        if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Unknown);
        }
        let now = Instant::now();
        let entry = {
            let mut table = self.table();
            table.purge_if_due(now);
            table.entries.remove(&digest(token))
        };
        let entry = entry.ok_or(TokenError::Unknown)?;
        if now >= entry.expires {
            return Err(TokenError::Expired);
        }
        if entry.grant.kind != kind {
            return Err(TokenError::WrongKind {
                wanted: kind,
                issued: entry.grant.kind,
            });
        }
        Ok(entry.grant)
    }

    /// What `redeem` would answer, without spending the token: lets a console page explain an
    /// expired or used link before it tries to connect.
    pub fn peek(&self, token: &str, kind: SessionKind) -> Result<Grant, TokenError> {
        if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Unknown);
        }
        let table = self.table();
        let entry = table
            .entries
            .get(&digest(token))
            .ok_or(TokenError::Unknown)?;
        if Instant::now() >= entry.expires {
            return Err(TokenError::Expired);
        }
        if entry.grant.kind != kind {
            return Err(TokenError::WrongKind {
                wanted: kind,
                issued: entry.grant.kind,
            });
        }
        Ok(entry.grant.clone())
    }

    /// Tokens held: outstanding ones and expired ones still remembered.
    pub fn len(&self) -> usize {
        self.table().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic cannot leave the map half-updated (each critical section is one map
        // operation), so a poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn stored_digests_for_tests(&self) -> Vec<[u8; 32]> {
        self.table().entries.keys().copied().collect()
    }
}

impl Table {
    fn purge_if_due(&mut self, now: Instant) {
        if now >= self.next_purge {
            self.purge(now);
        }
    }

    /// Forgets tokens that expired more than [`EXPIRED_MEMORY`] ago.
    fn purge(&mut self, now: Instant) {
        self.entries.retain(|_, e| now < e.expires + EXPIRED_MEMORY);
        self.next_purge = now + PURGE_EVERY;
    }

    fn evict_first_to_expire(&mut self) {
        let first = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.expires)
            .map(|(k, _)| *k);
        if let Some(key) = first {
            self.entries.remove(&key);
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether a console upgrade request with this `Origin` header may proceed: a defence against
/// cross-site WebSocket hijacking, on top of the token.
///
/// - An origin passes if its scheme, host and port equal those of `public_url` (vmhost's own
///   pages) or of an entry in `allowed` (e.g. UCloud's web app, `https://cloud.sdu.dk`).
///   Default ports count (`https://h` is `https://h:443`); hosts compare case-insensitively;
///   paths are ignored. There are no wildcards.
/// - `Origin: null` (sandboxed frames, `file:` pages) and malformed origins are refused.
/// - **A missing `Origin` is allowed.** Browsers always send `Origin` on a WebSocket handshake,
///   so a request without one does not come from a web page and cannot be a cross-site
///   hijack; non-browser clients (scripts, `websocat`, tests) still need a valid token.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String], public_url: &str) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let Some(origin) = scheme_host_port(origin) else {
        return false;
    };
    scheme_host_port(public_url).as_ref() == Some(&origin)
        || allowed
            .iter()
            .any(|a| scheme_host_port(a).as_ref() == Some(&origin))
}

/// `(scheme, host, port)` of an http(s) URL or origin; `None` for anything else.
fn scheme_host_port(s: &str) -> Option<(String, String, u16)> {
    let url = url::Url::parse(s.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let host = url.host_str()?.to_ascii_lowercase();
    let port = url.port_or_known_default()?;
    Some((url.scheme().to_owned(), host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(kind: SessionKind) -> Grant {
        Grant {
            job_id: "job-1".into(),
            rank: 2,
            user: "alice#1234".into(),
            kind,
        }
    }

    #[tokio::test]
    async fn an_issued_token_redeems_to_its_grant() {
        let tokens = SessionTokens::new(SessionTokens::DEFAULT_TTL);
        let token = tokens.issue(grant(SessionKind::Vnc));
        assert_eq!(
            tokens.redeem(&token, SessionKind::Vnc),
            Ok(grant(SessionKind::Vnc))
        );
        assert!(tokens.is_empty());
    }

    #[tokio::test]
    async fn a_token_is_single_use() {
        let tokens = SessionTokens::new(SessionTokens::DEFAULT_TTL);
        let token = tokens.issue(grant(SessionKind::Shell));
        assert!(tokens.redeem(&token, SessionKind::Shell).is_ok());
        assert_eq!(
            tokens.redeem(&token, SessionKind::Shell),
            Err(TokenError::Unknown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_says_expired_then_is_forgotten() {
        let tokens = SessionTokens::new(Duration::from_secs(60));
        let late = tokens.issue(grant(SessionKind::Vnc));
        let forgotten = tokens.issue(grant(SessionKind::Vnc));
        let in_time = tokens.issue(grant(SessionKind::Vnc));

        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(tokens.redeem(&in_time, SessionKind::Vnc).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            tokens.redeem(&late, SessionKind::Vnc),
            Err(TokenError::Expired)
        );

        tokio::time::advance(EXPIRED_MEMORY).await;
        assert_eq!(
            tokens.redeem(&forgotten, SessionKind::Vnc),
            Err(TokenError::Unknown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_tokens_are_purged_lazily() {
        let tokens = SessionTokens::new(Duration::from_secs(60));
        for _ in 0..10 {
            tokens.issue(grant(SessionKind::Vnc));
        }
        assert_eq!(tokens.len(), 10);
        tokio::time::advance(Duration::from_secs(60) + EXPIRED_MEMORY).await;
        assert_eq!(tokens.len(), 10, "nothing purges without a call");
        tokens.issue(grant(SessionKind::Shell));
        assert_eq!(tokens.len(), 1, "the issue purged the old ones");
    }

    #[tokio::test]
    async fn a_token_for_the_other_kind_is_refused_and_burnt() {
        let tokens = SessionTokens::new(SessionTokens::DEFAULT_TTL);
        let token = tokens.issue(grant(SessionKind::Vnc));
        assert_eq!(
            tokens.redeem(&token, SessionKind::Shell),
            Err(TokenError::WrongKind {
                wanted: SessionKind::Shell,
                issued: SessionKind::Vnc
            })
        );
        assert_eq!(
            tokens.redeem(&token, SessionKind::Vnc),
            Err(TokenError::Unknown)
        );
    }

    #[tokio::test]
    async fn tokens_are_stored_only_as_digests() {
        let tokens = SessionTokens::new(SessionTokens::DEFAULT_TTL);
        let token = tokens.issue(grant(SessionKind::Vnc));
        let stored = tokens.stored_digests_for_tests();
        assert_eq!(
            stored,
            vec![<[u8; 32]>::from(Sha256::digest(token.as_bytes()))]
        );
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        assert!(!stored.iter().any(|d| d.as_slice() == raw.as_slice()));
        let debug = format!("{tokens:?}");
        assert!(!debug.contains(&token), "{debug}");
        assert!(debug.contains("outstanding: 1"), "{debug}");
    }

    #[tokio::test]
    async fn tokens_carry_256_random_bits_in_url_safe_text() {
        let tokens = SessionTokens::new(SessionTokens::DEFAULT_TTL);
        let a = tokens.issue(grant(SessionKind::Vnc));
        let b = tokens.issue(grant(SessionKind::Vnc));
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
    }

    #[tokio::test]
    async fn malformed_tokens_are_unknown() {
        let tokens = SessionTokens::new(SessionTokens::DEFAULT_TTL);
        tokens.issue(grant(SessionKind::Vnc));
        for bad in ["", "x", &"A".repeat(10_000), "not base64 at all!"] {
            assert_eq!(
                tokens.redeem(bad, SessionKind::Vnc),
                Err(TokenError::Unknown)
            );
        }
        assert_eq!(tokens.len(), 1);
    }

    #[test]
    fn origins_match_scheme_host_and_port() {
        let public = "https://vmhost.example.org/some/prefix";
        let none: &[String] = &[];
        for ok in [
            "https://vmhost.example.org",
            "https://VMHOST.example.org:443",
            "https://vmhost.example.org/",
        ] {
            assert!(origin_allowed(Some(ok), none, public), "{ok}");
        }
        for refused in [
            "http://vmhost.example.org",
            "https://vmhost.example.org:8443",
            "https://evil.example.org",
            "https://vmhost.example.org.evil.example",
            "null",
            "",
            "vmhost.example.org",
            "ws://vmhost.example.org",
        ] {
            assert!(!origin_allowed(Some(refused), none, public), "{refused}");
        }
    }

    #[test]
    fn origins_in_the_allowed_list_pass() {
        let allowed = vec![
            "https://cloud.sdu.dk".to_owned(),
            "http://127.0.0.1:9000".to_owned(),
        ];
        let public = "https://vmhost.example.org";
        assert!(origin_allowed(
            Some("https://cloud.sdu.dk"),
            &allowed,
            public
        ));
        assert!(origin_allowed(
            Some("http://127.0.0.1:9000"),
            &allowed,
            public
        ));
        assert!(!origin_allowed(
            Some("http://127.0.0.1:9001"),
            &allowed,
            public
        ));
        assert!(!origin_allowed(Some("https://sdu.dk"), &allowed, public));
    }

    #[test]
    fn a_missing_origin_is_a_non_browser_client_and_passes() {
        assert!(origin_allowed(None, &[], "https://vmhost.example.org"));
    }
}
