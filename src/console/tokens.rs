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
//!   at most every [`PURGE_EVERY`], during `issue` and `redeem`, and sooner when room is needed
//!   (below).
//!
//! ## Limits: one user cannot crowd out another
//! The table is shared by every user, so its bounds are per user, in the spirit of the
//! short-lived single-use tickets of Nova's and Proxmox's consoles:
//! - one request asks for at most [`MAX_PER_REQUEST`] tokens ([`TokenError::TooManyAtOnce`]);
//! - one user holds at most [`MAX_PER_USER`] entries. Expired entries of that user are dropped
//!   first to make room (they only refine an error message); if the user's *live* (unexpired,
//!   unused) tokens still leave no room, the request is **refused**
//!   ([`TokenError::UserFull`]), nothing is evicted. So the table holds at most
//!   users × [`MAX_PER_USER`] entries, whatever anyone sends.
//! - past the whole table's last-resort bound ([`MAX_ENTRIES`]), every expired entry is dropped,
//!   and if that is not enough the request is refused ([`TokenError::Full`]). A live token is
//!   never evicted, neither another user's nor the caller's own.
//!
//! Why refuse rather than evict the user's oldest token: a link that was handed out keeps its
//! documented contract (usable once within the TTL) until it is used or expires, so a failure
//! shows up at once, on the request that caused it, with a `why` that says what to do, instead
//! of later, as a puzzling "unknown or already used" on a link the user did not touch. A
//! person clicking "open console" never reaches [`MAX_PER_USER`] within one TTL; a script that
//! does is only stopped until its own links expire. Issuing is **all or nothing**: a refused
//! request issues no token at all.
//!
//! Concurrency: one `std::sync::Mutex` around the table, never held across an `.await`; a
//! critical section is at most one request's worth ([`MAX_PER_REQUEST`]) of map operations or
//! one purge. Time is `tokio::time::Instant`, so tests run on a paused clock.

use std::collections::{HashMap, VecDeque};
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
/// Most tokens one request may ask for. A job has at most `max_replicas` (8) ranks and two
/// kinds of console, so a real request is far smaller; the bound keeps one request's work (and
/// one critical section) small, and below [`MAX_PER_USER`] so a single request always fits.
pub const MAX_PER_REQUEST: usize = 64;
/// Most entries one user holds: live tokens plus expired ones still remembered.
pub const MAX_PER_USER: usize = 256;
/// Last-resort bound on the whole table, reached only with hundreds of users at their cap.
/// Past it requests are refused; live tokens are never evicted (see the module docs).
pub const MAX_ENTRIES: usize = 100_000;

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
    /// Issuing: the request asks for more than [`MAX_PER_REQUEST`] tokens.
    #[error("{requested} console sessions requested at once; at most {max} per request")]
    TooManyAtOnce { requested: usize, max: usize },
    /// Issuing: the user's live tokens leave no room for the request (see the module docs).
    #[error(
        "too many open console links ({open} unused, at most {max} per user; {requested} more \
         requested); wait for them to expire (the oldest in {wait_secs} s) or use them"
    )]
    UserFull {
        open: usize,
        requested: usize,
        max: usize,
        wait_secs: u64,
    },
    /// Issuing: the whole table is at [`MAX_ENTRIES`] live tokens.
    #[error("vmhost holds too many open console links; try again in a minute")]
    Full,
}

/// Bounds of a table; [`SessionTokens::new`] takes the constants, tests take small ones.
#[derive(Debug, Clone, Copy)]
struct Limits {
    per_request: usize,
    per_user: usize,
    total: usize,
}

const LIMITS: Limits = Limits {
    per_request: MAX_PER_REQUEST,
    per_user: MAX_PER_USER,
    total: MAX_ENTRIES,
};

/// The table of outstanding tokens. Share it behind an `Arc`.
pub struct SessionTokens {
    ttl: Duration,
    limits: Limits,
    /// Only ever locked for one request's map operations or one purge (see the module docs).
    inner: Mutex<Table>,
}

/// Invariant: a digest is in `entries` if and only if it is in the `by_user` queue of its
/// grant's user, and no queue is empty.
struct Table {
    /// SHA-256 of the token → what it grants.
    entries: HashMap<[u8; 32], Entry>,
    /// Each user's digests with their expiry, oldest first. One TTL for all and `now` read
    /// under the lock make issue order the expiry order, so expired entries sit at the front
    /// and the per-user cap is checked without scanning the table.
    by_user: HashMap<String, VecDeque<([u8; 32], Instant)>>,
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

/// Refuses a request for `requested` tokens above [`MAX_PER_REQUEST`]: lets a handler refuse
/// before it does any per-item work.
pub fn check_request_size(requested: usize) -> Result<(), TokenError> {
    check_size(requested, MAX_PER_REQUEST)
}

fn check_size(requested: usize, max: usize) -> Result<(), TokenError> {
    if requested > max {
        return Err(TokenError::TooManyAtOnce { requested, max });
    }
    Ok(())
}

impl SessionTokens {
    /// A sensible time to connect: the browser opens the console right after UCloud hands it
    /// the URL.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

    /// A table whose tokens must be redeemed within `ttl` of being issued.
    pub fn new(ttl: Duration) -> SessionTokens {
        SessionTokens::with_limits(ttl, LIMITS)
    }

    fn with_limits(ttl: Duration, limits: Limits) -> SessionTokens {
        SessionTokens {
            ttl,
            limits,
            inner: Mutex::new(Table {
                entries: HashMap::new(),
                by_user: HashMap::new(),
                next_purge: Instant::now() + PURGE_EVERY,
            }),
        }
    }

    /// Issues a token for `grant`; only its digest is kept.
    pub fn issue(&self, grant: Grant) -> Result<String, TokenError> {
        let mut tokens = self.issue_all(vec![grant])?;
        // issue_all answers one token per grant.
        Ok(tokens.pop().expect("one token for one grant"))
    }

    /// Issues one token per grant, in order, or none at all: a refusal (see the module docs)
    /// leaves no token behind.
    pub fn issue_all(&self, grants: Vec<Grant>) -> Result<Vec<String>, TokenError> {
        check_size(grants.len(), self.limits.per_request)?;
        // Drawn before locking: each is a call into the OS.
        let tokens: Vec<String> = grants.iter().map(|_| new_token()).collect();
        let mut table = self.table();
        // Read under the lock, so every user's queue stays in expiry order.
        let now = Instant::now();
        table.purge_if_due(now);
        table.make_room(&grants, now, self.limits)?;
        let expires = now + self.ttl;
        for (token, grant) in tokens.iter().zip(grants) {
            table.insert(digest(token), Entry { grant, expires });
        }
        Ok(tokens)
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
            table.remove(&digest(token))
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
        // A panic cannot leave the table half-updated (`Table`'s methods restore its invariant
        // before anything that can panic: map operations only), so a poisoned lock still
        // guards consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn stored_digests_for_tests(&self) -> Vec<[u8; 32]> {
        self.table().entries.keys().copied().collect()
    }

    /// Entries held for `user`, after checking the table's invariant.
    #[cfg(test)]
    fn held_by_for_tests(&self, user: &str) -> usize {
        let table = self.table();
        let queued: usize = table.by_user.values().map(VecDeque::len).sum();
        assert_eq!(queued, table.entries.len(), "every entry is queued once");
        for (u, queue) in &table.by_user {
            assert!(!queue.is_empty(), "no empty queue is kept");
            assert!(queue.iter().all(|(d, _)| table.entries[d].grant.user == *u));
        }
        table.held_by(user)
    }
}

impl Table {
    fn held_by(&self, user: &str) -> usize {
        self.by_user.get(user).map_or(0, VecDeque::len)
    }

    fn insert(&mut self, key: [u8; 32], entry: Entry) {
        let queue = self.by_user.entry(entry.grant.user.clone()).or_default();
        queue.push_back((key, entry.expires));
        self.entries.insert(key, entry);
    }

    fn remove(&mut self, key: &[u8; 32]) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        if let Some(queue) = self.by_user.get_mut(&entry.grant.user) {
            queue.retain(|(k, _)| k != key);
            if queue.is_empty() {
                self.by_user.remove(&entry.grant.user);
            }
        }
        Some(entry)
    }

    /// Checks that `grants` fit, dropping expired entries where that makes room; a refusal
    /// leaves every live token in place (see the module docs).
    fn make_room(
        &mut self,
        grants: &[Grant],
        now: Instant,
        limits: Limits,
    ) -> Result<(), TokenError> {
        let mut wanted: HashMap<&str, usize> = HashMap::new();
        for grant in grants {
            *wanted.entry(grant.user.as_str()).or_default() += 1;
        }
        for (&user, &requested) in &wanted {
            if self.held_by(user) + requested <= limits.per_user {
                continue;
            }
            self.forget_expired_of(user, now, Duration::ZERO);
            let open = self.held_by(user);
            if open + requested > limits.per_user {
                let oldest = self.by_user.get(user).and_then(VecDeque::front);
                let wait =
                    oldest.map_or(Duration::ZERO, |&(_, e)| e.saturating_duration_since(now));
                return Err(TokenError::UserFull {
                    open,
                    requested,
                    max: limits.per_user,
                    // Rounded up: "in 0 s" would invite a retry that is refused again.
                    wait_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                });
            }
        }
        if self.entries.len() + grants.len() > limits.total {
            self.forget_expired(now, Duration::ZERO);
            if self.entries.len() + grants.len() > limits.total {
                return Err(TokenError::Full);
            }
        }
        Ok(())
    }

    fn purge_if_due(&mut self, now: Instant) {
        if now >= self.next_purge {
            self.forget_expired(now, EXPIRED_MEMORY);
            self.next_purge = now + PURGE_EVERY;
        }
    }

    /// Forgets every token that expired `memory` or more ago.
    fn forget_expired(&mut self, now: Instant, memory: Duration) {
        let users: Vec<String> = self.by_user.keys().cloned().collect();
        for user in users {
            self.forget_expired_of(&user, now, memory);
        }
    }

    /// Forgets `user`'s tokens that expired `memory` or more ago: a prefix of the queue.
    fn forget_expired_of(&mut self, user: &str, now: Instant, memory: Duration) {
        let Some(queue) = self.by_user.get_mut(user) else {
            return;
        };
        while let Some(&(key, expires)) = queue.front() {
            if now < expires + memory {
                break;
            }
            queue.pop_front();
            self.entries.remove(&key);
        }
        if queue.is_empty() {
            self.by_user.remove(user);
        }
    }
}

fn new_token() -> String {
    let mut raw = [0u8; TOKEN_BYTES];
    OsRng.fill_bytes(&mut raw);
    URL_SAFE_NO_PAD.encode(raw)
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
        let token = tokens.issue(grant(SessionKind::Vnc)).unwrap();
        assert_eq!(
            tokens.redeem(&token, SessionKind::Vnc),
            Ok(grant(SessionKind::Vnc))
        );
        assert!(tokens.is_empty());
    }

    #[tokio::test]
    async fn a_token_is_single_use() {
        let tokens = SessionTokens::new(SessionTokens::DEFAULT_TTL);
        let token = tokens.issue(grant(SessionKind::Shell)).unwrap();
        assert!(tokens.redeem(&token, SessionKind::Shell).is_ok());
        assert_eq!(
            tokens.redeem(&token, SessionKind::Shell),
            Err(TokenError::Unknown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_says_expired_then_is_forgotten() {
        let tokens = SessionTokens::new(Duration::from_secs(60));
        let late = tokens.issue(grant(SessionKind::Vnc)).unwrap();
        let forgotten = tokens.issue(grant(SessionKind::Vnc)).unwrap();
        let in_time = tokens.issue(grant(SessionKind::Vnc)).unwrap();

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
            tokens.issue(grant(SessionKind::Vnc)).unwrap();
        }
        assert_eq!(tokens.len(), 10);
        tokio::time::advance(Duration::from_secs(60) + EXPIRED_MEMORY).await;
        assert_eq!(tokens.len(), 10, "nothing purges without a call");
        tokens.issue(grant(SessionKind::Shell)).unwrap();
        assert_eq!(tokens.len(), 1, "the issue purged the old ones");
    }

    fn grant_for(user: &str, rank: u32) -> Grant {
        Grant {
            job_id: "job-1".into(),
            rank,
            user: user.into(),
            kind: SessionKind::Vnc,
        }
    }

    /// `n` tokens for `user`, in requests of at most [`MAX_PER_REQUEST`].
    #[track_caller]
    fn issue_many(tokens: &SessionTokens, user: &str, n: usize) -> Vec<String> {
        let mut issued = Vec::new();
        while issued.len() < n {
            let batch = (n - issued.len()).min(MAX_PER_REQUEST);
            let grants = (0..batch).map(|i| grant_for(user, i as u32)).collect();
            issued.extend(tokens.issue_all(grants).unwrap());
        }
        issued
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_at_the_cap_is_refused_and_keeps_every_token() {
        let tokens = SessionTokens::new(Duration::from_secs(60));
        let alice = issue_many(&tokens, "alice", MAX_PER_USER);
        tokio::time::advance(Duration::from_millis(20_500)).await;
        assert_eq!(
            tokens.issue(grant_for("alice", 0)),
            Err(TokenError::UserFull {
                open: MAX_PER_USER,
                requested: 1,
                max: MAX_PER_USER,
                wait_secs: 40,
            })
        );
        assert_eq!(tokens.held_by_for_tests("alice"), MAX_PER_USER);
        for token in &alice {
            assert!(tokens.redeem(token, SessionKind::Vnc).is_ok());
        }
        assert!(
            tokens.issue(grant_for("alice", 0)).is_ok(),
            "used links free room"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_request_issues_nothing() {
        let tokens = SessionTokens::new(Duration::from_secs(60));
        issue_many(&tokens, "alice", MAX_PER_USER - 10);
        let eleven = (0..11).map(|r| grant_for("alice", r)).collect();
        assert!(matches!(
            tokens.issue_all(eleven),
            Err(TokenError::UserFull { open, requested: 11, .. }) if open == MAX_PER_USER - 10
        ));
        assert_eq!(tokens.held_by_for_tests("alice"), MAX_PER_USER - 10);
        let too_many = (0..=MAX_PER_REQUEST as u32)
            .map(|r| grant_for("bob", r))
            .collect();
        assert_eq!(
            tokens.issue_all(too_many),
            Err(TokenError::TooManyAtOnce {
                requested: MAX_PER_REQUEST + 1,
                max: MAX_PER_REQUEST
            })
        );
        assert_eq!(check_request_size(MAX_PER_REQUEST), Ok(()));
        assert!(check_request_size(MAX_PER_REQUEST + 1).is_err());
        assert_eq!(tokens.len(), MAX_PER_USER - 10);
        let ten = (0..10).map(|r| grant_for("alice", r)).collect();
        assert_eq!(
            tokens.issue_all(ten).unwrap().len(),
            10,
            "exactly the room left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_user_cannot_evict_or_exhaust_another() {
        let tokens = SessionTokens::new(Duration::from_secs(60));
        let bob = tokens.issue(grant_for("bob", 0)).unwrap();
        // Alice floods: everything past her own cap is refused.
        for _ in 0..(2 * MAX_PER_USER / MAX_PER_REQUEST) {
            let grants = (0..MAX_PER_REQUEST as u32)
                .map(|r| grant_for("alice", r))
                .collect();
            let _ = tokens.issue_all(grants);
        }
        assert_eq!(tokens.held_by_for_tests("alice"), MAX_PER_USER);
        assert_eq!(
            tokens.redeem(&bob, SessionKind::Vnc),
            Ok(grant_for("bob", 0))
        );
        assert!(
            tokens.issue(grant_for("bob", 1)).is_ok(),
            "bob still gets links"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_refuses_rather_than_evicting_a_live_token() {
        let limits = Limits {
            per_request: 4,
            per_user: 8,
            total: 10,
        };
        let tokens = SessionTokens::with_limits(Duration::from_secs(60), limits);
        let bob: Vec<String> = (0..3)
            .map(|r| tokens.issue(grant_for("bob", r)).unwrap())
            .collect();
        tokio::time::advance(Duration::from_secs(1)).await;
        let alice: Vec<String> = (0..7)
            .map(|r| tokens.issue(grant_for("alice", r)).unwrap())
            .collect();
        assert_eq!(tokens.issue(grant_for("alice", 7)), Err(TokenError::Full));
        assert_eq!(tokens.issue(grant_for("carol", 0)), Err(TokenError::Full));
        assert_eq!(tokens.len(), 10);
        for token in &bob {
            assert!(tokens.redeem(token, SessionKind::Vnc).is_ok());
        }
        // Expired entries, whoever they belong to, make room.
        tokio::time::advance(Duration::from_secs(60)).await;
        let carol = (0..4).map(|r| grant_for("carol", r)).collect();
        assert!(tokens.issue_all(carol).is_ok());
        assert_eq!(tokens.len(), 4, "alice's expired tokens made room");
        assert_eq!(
            tokens.redeem(&alice[0], SessionKind::Vnc),
            Err(TokenError::Unknown)
        );
        assert_eq!(tokens.held_by_for_tests("alice"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_tokens_make_room_so_the_table_stays_bounded() {
        let tokens = SessionTokens::new(Duration::from_secs(60));
        let mut last = Vec::new();
        // Well within EXPIRED_MEMORY and PURGE_EVERY, so only the per-user cap purges.
        for _ in 0..5 {
            for user in ["alice", "bob"] {
                last = issue_many(&tokens, user, MAX_PER_USER);
            }
            assert_eq!(tokens.len(), 2 * MAX_PER_USER);
            assert_eq!(tokens.held_by_for_tests("alice"), MAX_PER_USER);
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        // The newest expired links are still told apart from unknown ones.
        assert_eq!(
            tokens.redeem(&last[0], SessionKind::Vnc),
            Err(TokenError::Expired)
        );
        assert_eq!(tokens.held_by_for_tests("bob"), MAX_PER_USER - 1);
        tokio::time::advance(EXPIRED_MEMORY).await;
        tokens.issue(grant_for("carol", 0)).unwrap();
        assert_eq!(tokens.len(), 1, "the periodic purge forgot the rest");
        assert_eq!(tokens.held_by_for_tests("alice"), 0);
    }

    #[tokio::test]
    async fn a_token_for_the_other_kind_is_refused_and_burnt() {
        let tokens = SessionTokens::new(SessionTokens::DEFAULT_TTL);
        let token = tokens.issue(grant(SessionKind::Vnc)).unwrap();
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
        let token = tokens.issue(grant(SessionKind::Vnc)).unwrap();
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
        let a = tokens.issue(grant(SessionKind::Vnc)).unwrap();
        let b = tokens.issue(grant(SessionKind::Vnc)).unwrap();
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
        tokens.issue(grant(SessionKind::Vnc)).unwrap();
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
