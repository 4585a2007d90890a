//! vmhost's side of Core's control API against a fake Core on 127.0.0.1: access tokens
//! (`provider::control`) and the delivery of job updates (`provider::reporter`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use vmhost::config::UcloudConfig;
use vmhost::jobs::{now_millis, JobChange, JobState, JobUpdate};
use vmhost::provider::control::{ControlError, CoreClient};
use vmhost::provider::reporter::{self, ReporterSettings};
use vmhost::store::{NewJob, Store};

const REFRESH_TOKEN: &str = "refresh-token-of-vmhost";
/// Every wait for the reporter ends by then, or the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// What the fake Core saw.
#[derive(Debug, Default, Clone)]
struct CoreLog {
    /// Each refresh call's body, and whether it carried an `Authorization` header.
    refreshes: Vec<(Value, bool)>,
    /// Access tokens handed out, in order.
    issued: Vec<String>,
    /// Each `jobs/control/update` call: the bearer token, the status answered, how many items.
    attempts: Vec<Attempt>,
    /// The items of accepted update calls, in the order received: (Core's id, update).
    accepted: Vec<(String, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
struct Attempt {
    bearer: Option<String>,
    status: u16,
    items: usize,
}

/// How the fake Core behaves; tests change it as they go.
#[derive(Debug, Clone)]
struct Behaviour {
    /// `exp` of issued tokens, in seconds from now; `None` issues tokens that are not JWTs.
    token_lifetime: Option<i64>,
    /// Tokens issued before this many were handed out are refused with 401.
    valid_from: usize,
    /// Refuse every token with 401.
    refuse_all_tokens: bool,
    /// Answer update calls with this status (after the token check).
    fail_with: Option<StatusCode>,
    /// Answer refresh calls with a body that is not a refresh answer.
    garble_refresh: bool,
    /// Answer 400 to update calls that carry any of these Core ids (after the token check).
    refuse_ids: Vec<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            token_lifetime: Some(600),
            valid_from: 0,
            refuse_all_tokens: false,
            fail_with: None,
            garble_refresh: false,
            refuse_ids: Vec::new(),
        }
    }
}

struct FakeCore {
    behaviour: Mutex<Behaviour>,
    log: watch::Sender<CoreLog>,
}

impl FakeCore {
    fn behave(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.behaviour.lock().unwrap());
    }

    fn log(&self) -> CoreLog {
        self.log.borrow().clone()
    }

    /// Waits until the log satisfies `done`.
    async fn wait_for(&self, what: &str, done: impl FnMut(&CoreLog) -> bool) -> CoreLog {
        let mut rx = self.log.subscribe();
        let seen = match tokio::time::timeout(PATIENCE, rx.wait_for(done)).await {
            Ok(Ok(log)) => Some(log.clone()),
            _ => None,
        };
        seen.unwrap_or_else(|| panic!("fake Core never saw {what}; it saw {:#?}", self.log()))
    }
}

fn jwt(claims: &Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes()),
        b64(b"not-a-signature")
    )
}

async fn refresh(
    State(core): State<Arc<FakeCore>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let behaviour = core.behaviour.lock().unwrap().clone();
    let mut answer = None;
    core.log.send_modify(|log| {
        log.refreshes
            .push((body.clone(), headers.contains_key("authorization")));
        if body["items"][0]["refreshToken"] != REFRESH_TOKEN {
            return;
        }
        let n = log.issued.len();
        let token = match behaviour.token_lifetime {
            Some(secs) => jwt(&json!({
                "sub": "#P_vmhost", "role": "PROVIDER", "n": n,
                "iat": now_millis() / 1000, "exp": now_millis() / 1000 + secs,
            })),
            None => format!("opaque-token-{n}"),
        };
        log.issued.push(token.clone());
        answer = Some(token);
    });
    match answer {
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"statusCode": 401, "why": "Unauthorized"})),
        )
            .into_response(),
        Some(_) if behaviour.garble_refresh => Json(json!({"responses": []})).into_response(),
        Some(token) => {
            Json(json!({"responses": [{"accessToken": token, "csrfToken": ""}]})).into_response()
        }
    }
}

async fn update(
    State(core): State<Arc<FakeCore>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let behaviour = core.behaviour.lock().unwrap().clone();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let items = body["items"].as_array().cloned().unwrap_or_default();
    let mut status = StatusCode::OK;
    core.log.send_modify(|log| {
        let known = bearer
            .as_ref()
            .and_then(|b| log.issued.iter().position(|t| t == b));
        status = match known {
            Some(i) if i >= behaviour.valid_from && !behaviour.refuse_all_tokens => {
                let refused = items.iter().any(|item| {
                    behaviour
                        .refuse_ids
                        .iter()
                        .any(|id| item["id"] == id.as_str())
                });
                if refused {
                    StatusCode::BAD_REQUEST
                } else {
                    behaviour.fail_with.unwrap_or(StatusCode::OK)
                }
            }
            _ => StatusCode::UNAUTHORIZED,
        };
        log.attempts.push(Attempt {
            bearer: bearer.clone(),
            status: status.as_u16(),
            items: items.len(),
        });
        if status.is_success() {
            for item in &items {
                let id = item["id"].as_str().expect("a string id").to_owned();
                log.accepted.push((id, item["update"].clone()));
            }
        }
    });
    if status.is_success() {
        Json(json!({})).into_response()
    } else {
        let why = "Core is having a bad day. ".repeat(100);
        (
            status,
            Json(json!({"statusCode": status.as_u16(), "why": why})),
        )
            .into_response()
    }
}

/// A fake Core on 127.0.0.1 and its base URL.
async fn fake_core() -> (Arc<FakeCore>, String) {
    let core = Arc::new(FakeCore {
        behaviour: Mutex::new(Behaviour::default()),
        log: watch::Sender::new(CoreLog::default()),
    });
    let app = Router::new()
        .route("/auth/providers/refresh", post(refresh))
        .route("/api/jobs/control/update", post(update))
        .with_state(core.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (core, base)
}

fn client(base: &str, refresh_token: &str) -> CoreClient {
    CoreClient::new(&UcloudConfig {
        // The trailing slash must not double up in the URLs called.
        core_url: format!("{base}/"),
        refresh_token: refresh_token.to_owned(),
        public_key: String::new(),
    })
    .unwrap()
}

/// Settings that make a test take milliseconds instead of seconds.
fn quick() -> ReporterSettings {
    ReporterSettings {
        batch: 200,
        poll: Duration::from_millis(50),
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
    }
}

async fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("vmhost.db")).unwrap();
    (store, dir)
}

fn update_of(timestamp: i64, state: Option<JobState>, status: &str) -> JobUpdate {
    JobUpdate {
        timestamp,
        state,
        status: Some(status.to_owned()),
    }
}

/// The wire form of `update_of(..)`, as Core receives it.
fn wire(core_id: &str, timestamp: i64, state: Option<JobState>, status: &str) -> (String, Value) {
    (
        core_id.to_owned(),
        json!({"state": state.map(JobState::as_str), "status": status, "timestamp": timestamp}),
    )
}

/// Inserts a job (Core's when `core_id` is set); returns vmhost's id.
async fn insert_job(store: &Store, core_id: Option<&str>, first_timestamp: i64) -> String {
    let spec = serde_json::from_value(json!({
        "application": { "name": "debian-cloud", "version": "12" },
        "product": { "id": "vm-small", "category": "vm", "provider": "vmhost" },
    }))
    .unwrap();
    let job = NewJob {
        owner: "alice".to_owned(),
        spec,
        fingerprint: format!("job {core_id:?}"),
        created_at: first_timestamp,
        first_update: update_of(first_timestamp, Some(JobState::InQueue), "queued"),
        public_ips: Vec::new(),
        unique: false,
        core_id: core_id.map(str::to_owned),
    };
    store.insert_jobs(vec![job], None).await.unwrap().remove(0)
}

/// Waits until the store holds no unreported update.
async fn all_reported(store: &Store) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left = store.unreported_updates(1000).await.unwrap();
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still unreported: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A receiver whose sender stays open (and unused) for the test's duration.
fn quiet_changes() -> (broadcast::Sender<JobChange>, broadcast::Receiver<JobChange>) {
    broadcast::channel(16)
}

#[tokio::test]
async fn updates_reach_core_in_seq_order_under_cores_ids() {
    let (core, base) = fake_core().await;
    let (store, _dir) = store().await;
    let a = insert_job(&store, Some("54112"), 100).await;
    let standalone = insert_job(&store, None, 150).await;
    let b = insert_job(&store, Some("54113"), 200).await;
    store
        .append_update(&a, update_of(101, Some(JobState::Running), "running"))
        .await
        .unwrap();
    store
        .append_update(&standalone, update_of(151, Some(JobState::Running), "mine"))
        .await
        .unwrap();
    store
        .append_update(&b, update_of(201, None, "still booting"))
        .await
        .unwrap();
    store
        .append_update(&a, update_of(102, Some(JobState::Success), "done"))
        .await
        .unwrap();
    store
        .append_update(&b, update_of(202, Some(JobState::Running), "running"))
        .await
        .unwrap();

    let (_tx, rx) = quiet_changes();
    let task = reporter::spawn_with(store.clone(), client(&base, REFRESH_TOKEN), rx, quick());
    let log = core
        .wait_for("six updates", |l| l.accepted.len() >= 6)
        .await;
    all_reported(&store).await;
    task.abort();

    let in_queue = Some(JobState::InQueue);
    assert_eq!(
        log.accepted,
        vec![
            wire("54112", 100, in_queue, "queued"),
            wire("54112", 101, Some(JobState::Running), "running"),
            wire("54112", 102, Some(JobState::Success), "done"),
            wire("54113", 200, in_queue, "queued"),
            wire("54113", 201, None, "still booting"),
            wire("54113", 202, Some(JobState::Running), "running"),
        ]
    );
    assert_eq!(log.attempts.len(), 1, "one call for the whole backlog");
}

#[tokio::test]
async fn a_backlog_larger_than_a_batch_goes_in_order_over_several_calls() {
    let (core, base) = fake_core().await;
    let (store, _dir) = store().await;
    let job = insert_job(&store, Some("7"), 1000).await;
    let mut expected = vec![wire("7", 1000, Some(JobState::InQueue), "queued")];
    for i in 1..=6 {
        store
            .append_update(&job, update_of(1000 + i, None, &format!("step {i}")))
            .await
            .unwrap();
        expected.push(wire("7", 1000 + i, None, &format!("step {i}")));
    }

    let (_tx, rx) = quiet_changes();
    let settings = ReporterSettings {
        batch: 3,
        // Long enough that only a full batch explains the follow-up calls.
        poll: Duration::from_secs(3600),
        ..quick()
    };
    let task = reporter::spawn_with(store.clone(), client(&base, REFRESH_TOKEN), rx, settings);
    let log = core
        .wait_for("seven updates", |l| l.accepted.len() >= 7)
        .await;
    all_reported(&store).await;
    task.abort();

    assert_eq!(log.accepted, expected);
    let sizes: Vec<usize> = log.attempts.iter().map(|a| a.items).collect();
    assert_eq!(sizes, [3, 3, 1]);
}

#[tokio::test]
async fn an_outage_delays_updates_and_recovery_delivers_each_once_in_order() {
    let (core, base) = fake_core().await;
    let (store, _dir) = store().await;
    let job = insert_job(&store, Some("900"), 10).await;
    store
        .append_update(&job, update_of(11, Some(JobState::Running), "running"))
        .await
        .unwrap();
    core.behave(|b| b.fail_with = Some(StatusCode::SERVICE_UNAVAILABLE));

    let (tx, rx) = broadcast::channel(16);
    let task = reporter::spawn_with(store.clone(), client(&base, REFRESH_TOKEN), rx, quick());
    core.wait_for("three refused calls", |l| l.attempts.len() >= 3)
        .await;
    // More history while Core is down; it must queue behind the first two.
    let late = update_of(12, None, "written during the outage");
    store.append_update(&job, late.clone()).await.unwrap();
    let _ = tx.send(JobChange {
        job_id: job.clone(),
        update: late,
    });
    core.wait_for("two more refused calls", |l| l.attempts.len() >= 5)
        .await;
    let log = core.log();
    assert!(log.accepted.is_empty());
    assert!(log.attempts.iter().all(|a| a.status == 503));
    let pending: Vec<u32> = store
        .unreported_updates(1000)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(pending.len(), 3, "nothing is marked before Core accepts it");

    core.behave(|b| b.fail_with = None);
    core.wait_for("the backlog", |l| !l.accepted.is_empty())
        .await;
    all_reported(&store).await;
    // One more update: only it may follow, nothing sent before may come again.
    let after = update_of(13, Some(JobState::Success), "done");
    store.append_update(&job, after.clone()).await.unwrap();
    let _ = tx.send(JobChange {
        job_id: job.clone(),
        update: after,
    });
    let log = core
        .wait_for("four updates", |l| l.accepted.len() >= 4)
        .await;
    all_reported(&store).await;
    task.abort();

    assert_eq!(
        log.accepted,
        vec![
            wire("900", 10, Some(JobState::InQueue), "queued"),
            wire("900", 11, Some(JobState::Running), "running"),
            wire("900", 12, None, "written during the outage"),
            wire("900", 13, Some(JobState::Success), "done"),
        ]
    );
    assert_eq!(core.log().accepted.len(), 4, "nothing was sent twice");
    assert_eq!(
        log.refreshes.len(),
        1,
        "a 503 is no reason to renew the token"
    );
}

#[tokio::test]
async fn changes_wake_the_reporter_also_after_its_receiver_lagged() {
    let (core, base) = fake_core().await;
    let (store, _dir) = store().await;
    let job = insert_job(&store, Some("31"), 1).await;
    // A capacity of one, so that two sends in a row overflow it.
    let (tx, rx) = broadcast::channel(1);
    // With an hour between polls, only a change explains a prompt delivery.
    let settings = ReporterSettings {
        poll: Duration::from_secs(3600),
        ..quick()
    };
    let task = reporter::spawn_with(store.clone(), client(&base, REFRESH_TOKEN), rx, settings);
    core.wait_for("the first update", |l| l.accepted.len() == 1)
        .await;
    all_reported(&store).await;
    let announce = |timestamp: i64| {
        let update = update_of(timestamp, None, &format!("update {timestamp}"));
        let store = store.clone();
        let tx = tx.clone();
        let job = job.clone();
        async move {
            store.append_update(&job, update.clone()).await.unwrap();
            let _ = tx.send(JobChange {
                job_id: job,
                update,
            });
        }
    };

    announce(2).await;
    core.wait_for("the second update", |l| l.accepted.len() == 2)
        .await;

    // While the reporter backs off nobody receives, so these sends overflow the channel.
    core.behave(|b| b.fail_with = Some(StatusCode::SERVICE_UNAVAILABLE));
    announce(3).await;
    core.wait_for("a refused call", |l| {
        l.attempts.iter().any(|a| a.status == 503)
    })
    .await;
    let announced = update_of(3, None, "again");
    for _ in 0..3 {
        let _ = tx.send(JobChange {
            job_id: job.clone(),
            update: announced.clone(),
        });
    }
    let failed = core.log().attempts.len();
    core.wait_for("more refused calls", |l| l.attempts.len() >= failed + 2)
        .await;
    core.behave(|b| b.fail_with = None);
    core.wait_for("the third update", |l| l.accepted.len() == 3)
        .await;

    // The lag is behind it: a change must still wake the reporter.
    announce(4).await;
    let log = core
        .wait_for("four updates", |l| l.accepted.len() >= 4)
        .await;
    task.abort();
    let statuses: Vec<&str> = log
        .accepted
        .iter()
        .map(|(_, u)| u["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "update 2", "update 3", "update 4"]);
}

#[tokio::test]
async fn without_changes_the_store_is_still_polled() {
    let (core, base) = fake_core().await;
    let (store, _dir) = store().await;
    let job = insert_job(&store, Some("32"), 1).await;
    let (tx, rx) = broadcast::channel(1);
    drop(tx);
    let task = reporter::spawn_with(store.clone(), client(&base, REFRESH_TOKEN), rx, quick());
    core.wait_for("the first update", |l| l.accepted.len() == 1)
        .await;
    store
        .append_update(&job, update_of(2, None, "unannounced"))
        .await
        .unwrap();
    let log = core
        .wait_for("the second update", |l| l.accepted.len() == 2)
        .await;
    task.abort();
    assert_eq!(log.accepted[1], wire("32", 2, None, "unannounced"));
}

fn report(core_id: &str, seq: u32) -> vmhost::store::CoreReport {
    vmhost::store::CoreReport {
        core_id: core_id.to_owned(),
        job_id: "1".to_owned(),
        seq,
        update: update_of(i64::from(seq), None, "x"),
    }
}

#[tokio::test]
async fn the_refresh_token_is_sent_and_the_access_token_is_the_bearer() {
    let (core, base) = fake_core().await;
    let client = client(&base, REFRESH_TOKEN);
    client.update_jobs(&[report("1", 1)]).await.unwrap();

    let log = core.log();
    assert_eq!(
        log.refreshes,
        vec![(json!({"items": [{"refreshToken": REFRESH_TOKEN}]}), false)],
        "the refresh call carries the refresh token and no Authorization header"
    );
    assert_eq!(log.issued.len(), 1);
    assert_eq!(
        log.attempts,
        vec![Attempt {
            bearer: Some(log.issued[0].clone()),
            status: 200,
            items: 1
        }]
    );
}

#[tokio::test]
async fn a_fresh_token_is_reused() {
    let (core, base) = fake_core().await;
    let client = client(&base, REFRESH_TOKEN);
    for seq in 1..=3 {
        client.update_jobs(&[report("1", seq)]).await.unwrap();
    }
    let log = core.log();
    assert_eq!(log.issued.len(), 1);
    assert!(log
        .attempts
        .iter()
        .all(|a| a.bearer.as_ref() == Some(&log.issued[0])));
}

#[tokio::test]
async fn a_token_near_expiry_is_renewed_before_use() {
    let (core, base) = fake_core().await;
    // Under three minutes left: each token serves the call it was fetched for, no more.
    core.behave(|b| b.token_lifetime = Some(120));
    let client = client(&base, REFRESH_TOKEN);
    client.update_jobs(&[report("1", 1)]).await.unwrap();
    client.update_jobs(&[report("1", 2)]).await.unwrap();

    let log = core.log();
    assert_eq!(log.issued.len(), 2);
    let bearers: Vec<&str> = log
        .attempts
        .iter()
        .map(|a| a.bearer.as_deref().unwrap())
        .collect();
    assert_eq!(bearers, [&log.issued[0], &log.issued[1]]);
    assert!(
        log.attempts.iter().all(|a| a.status == 200),
        "no 401 needed"
    );
}

#[tokio::test]
async fn a_token_without_a_readable_exp_is_still_reused_for_a_while() {
    let (core, base) = fake_core().await;
    core.behave(|b| b.token_lifetime = None);
    let client = client(&base, REFRESH_TOKEN);
    client.update_jobs(&[report("1", 1)]).await.unwrap();
    client.update_jobs(&[report("1", 2)]).await.unwrap();
    assert_eq!(core.log().issued, ["opaque-token-0"]);
}

#[tokio::test]
async fn a_refused_token_is_renewed_once_and_the_call_retried() {
    let (core, base) = fake_core().await;
    let client = client(&base, REFRESH_TOKEN);
    client.update_jobs(&[report("1", 1)]).await.unwrap();
    // Core forgets the token although its exp is ten minutes away.
    core.behave(|b| b.valid_from = 1);
    client.update_jobs(&[report("1", 2)]).await.unwrap();

    let log = core.log();
    assert_eq!(log.issued.len(), 2);
    let seen: Vec<(&str, u16)> = log
        .attempts
        .iter()
        .map(|a| (a.bearer.as_deref().unwrap(), a.status))
        .collect();
    assert_eq!(
        seen,
        [
            (log.issued[0].as_str(), 200),
            (log.issued[0].as_str(), 401),
            (log.issued[1].as_str(), 200),
        ]
    );
    let seqs: Vec<&Value> = log.accepted.iter().map(|(_, u)| &u["timestamp"]).collect();
    assert_eq!(seqs, [1, 2]);
}

#[tokio::test]
async fn a_token_refused_again_after_renewal_is_an_error_not_a_loop() {
    let (core, base) = fake_core().await;
    core.behave(|b| b.refuse_all_tokens = true);
    let client = client(&base, REFRESH_TOKEN);
    let err = client.update_jobs(&[report("1", 1)]).await.unwrap_err();
    assert!(
        matches!(err, ControlError::Refused { status, .. } if status == StatusCode::UNAUTHORIZED),
        "{err:?}"
    );
    let log = core.log();
    assert_eq!(log.refreshes.len(), 2);
    assert_eq!(log.attempts.len(), 2);
}

#[tokio::test]
async fn refusals_outages_and_bad_refresh_answers_are_told_apart() {
    let (core, base) = fake_core().await;
    let reports = [report("1", 1)];

    core.behave(|b| b.fail_with = Some(StatusCode::SERVICE_UNAVAILABLE));
    let err = client(&base, REFRESH_TOKEN)
        .update_jobs(&reports)
        .await
        .unwrap_err();
    let ControlError::Refused { url, status, body } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(url, &format!("{base}/api/jobs/control/update"));
    assert!(body.starts_with(r#"{"statusCode":503"#), "{body}");
    assert!(body.chars().count() < 600, "the body is cut: {body}");
    core.behave(|b| b.fail_with = None);

    // A refresh token Core does not know: the refresh is refused, no update is attempted.
    let attempts = core.log().attempts.len();
    let err = client(&base, "stolen")
        .update_jobs(&reports)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ControlError::Refused { url, status, .. }
            if *status == StatusCode::UNAUTHORIZED && url.ends_with("/auth/providers/refresh")),
        "{err:?}"
    );
    assert_eq!(core.log().attempts.len(), attempts);

    core.behave(|b| b.garble_refresh = true);
    let err = client(&base, REFRESH_TOKEN)
        .update_jobs(&reports)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ControlError::BadRefreshResponse { .. }),
        "{err:?}"
    );

    // Nobody listens on a port just released.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let err = client(&closed, REFRESH_TOKEN)
        .update_jobs(&reports)
        .await
        .unwrap_err();
    assert!(matches!(err, ControlError::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn nothing_is_sent_for_no_updates() {
    let (core, base) = fake_core().await;
    client(&base, REFRESH_TOKEN).update_jobs(&[]).await.unwrap();
    let log = core.log();
    assert!(log.refreshes.is_empty() && log.attempts.is_empty());
}

/// Core refuses one job's updates for good (it deleted the job, say): they are set aside and
/// the other jobs' updates still arrive, now and later.
#[tokio::test]
async fn a_job_core_refuses_for_good_does_not_hold_up_the_others() {
    let (core, base) = fake_core().await;
    core.behave(|b| b.refuse_ids = vec!["gone".to_owned()]);
    let (store, _dir) = store().await;
    let gone = insert_job(&store, Some("gone"), 100).await;
    let kept = insert_job(&store, Some("kept"), 200).await;
    store
        .append_update(&gone, update_of(101, Some(JobState::Running), "running"))
        .await
        .unwrap();
    let (_tx, rx) = quiet_changes();
    let task = reporter::spawn_with(store.clone(), client(&base, REFRESH_TOKEN), rx, quick());
    all_reported(&store).await;
    store
        .append_update(&kept, update_of(201, Some(JobState::Running), "running"))
        .await
        .unwrap();
    let log = core
        .wait_for("both updates of the kept job", |log| {
            log.accepted.len() == 2
        })
        .await;
    task.abort();
    assert_eq!(
        log.accepted,
        [
            wire("kept", 200, Some(JobState::InQueue), "queued"),
            wire("kept", 201, Some(JobState::Running), "running"),
        ]
    );
    assert!(
        log.attempts.iter().any(|a| a.status == 400),
        "the mixed batch was refused first: {:#?}",
        log.attempts
    );
}
