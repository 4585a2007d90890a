//! Core's control API as vmhost uses it: access tokens from the refresh token, and job updates.
//!
//! Every control call carries `Authorization: Bearer <access token>`. Core hands access tokens
//! out for the provider's refresh token (`POST /auth/providers/refresh`); they are RS256 JWTs
//! that live 10 minutes. [`CoreClient`] caches one and renews it when less than
//! [`RENEW_BEFORE_EXP`] remain before its `exp`, as UCloud's own integration module does. The
//! `exp` is read without verifying the signature: the token is Core's to check, vmhost only
//! needs to know when to fetch the next one. A call Core answers with 401 renews the token once
//! and is retried once, which covers clocks that disagree and tokens Core revoked.
//!
//! Tokens never appear in logs, errors or `Debug` output.
//!
//! Concurrency: the cached token sits behind an async mutex that is held while a renewal is in
//! flight, so callers sharing one client never refresh at the same time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::UcloudConfig;
use crate::store::CoreReport;

/// Each request to Core, connecting included, must finish within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// An access token is renewed when less than this remains before its `exp`.
pub const RENEW_BEFORE_EXP: Duration = Duration::from_secs(3 * 60);
/// How long a token whose `exp` cannot be read is used before it is renewed.
pub const UNREADABLE_EXP_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// The longest a token is cached whatever its `exp` says: a wildly wrong `exp` (or local
/// clock) then costs one refresh an hour instead of a token kept forever.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// How much of a refusal's body an error keeps.
const MAX_BODY_CHARS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot set up the HTTP client for Core")]
    Setup {
        #[source]
        err: reqwest::Error,
    },
    #[error("cannot reach Core at {url}")]
    Unreachable {
        url: String,
        #[source]
        err: reqwest::Error,
    },
    #[error("Core did not answer {url} within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout {
        url: String,
        #[source]
        err: reqwest::Error,
    },
    /// Core answered with a status other than 2xx; `body` is the start of its answer.
    #[error("Core refused {url} with {status}: {body}")]
    Refused {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("Core's answer to the token refresh is unusable: {why}")]
    BadRefreshResponse { why: String },
}

/// A client of Core's control API, authenticated as this provider. Cheap to clone; clones
/// share the cached access token.
#[derive(Clone)]
pub struct CoreClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `core_url` without a trailing `/`.
    base: String,
    refresh_token: String,
    /// The access token in use; `None` until the first call and after Core refused it.
    token: Mutex<Option<CachedToken>>,
}

struct CachedToken {
    value: String,
    renew_at: Instant,
}

impl std::fmt::Debug for CoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written so that neither token can end up in a log line.
        f.debug_struct("CoreClient")
            .field("core_url", &self.inner.base)
            .finish_non_exhaustive()
    }
}

impl CoreClient {
    /// A client for the Core at `config.core_url`; nothing is sent until the first call.
    pub fn new(config: &UcloudConfig) -> Result<CoreClient, ControlError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            // Core does not redirect its API; following one would turn the POST into a GET
            // and could carry the token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| ControlError::Setup { err })?;
        Ok(CoreClient {
            inner: Arc::new(Inner {
                http,
                base: config.core_url.trim_end_matches('/').to_owned(),
                refresh_token: config.refresh_token.clone(),
                token: Mutex::new(None),
            }),
        })
    }

    /// Appends `reports` to the histories of Core's jobs, in the order given, in one call.
    /// `Ok` means Core accepted all of them (any 2xx).
    pub async fn update_jobs(&self, reports: &[CoreReport]) -> Result<(), ControlError> {
        if reports.is_empty() {
            return Ok(());
        }
        let body = serde_json::to_vec(&update_body(reports))
            .expect("the update body holds only strings and integers");
        self.post_authorized("/api/jobs/control/update", body)
            .await
            .map(drop)
    }

    /// POSTs `body` with the access token; on 401 renews the token once and retries once.
    async fn post_authorized(&self, path: &str, body: Vec<u8>) -> Result<Vec<u8>, ControlError> {
        let url = format!("{}{path}", self.inner.base);
        let token = self.access_token().await?;
        match self.post(&url, Some(&token), body.clone()).await {
            Err(ControlError::Refused {
                status: StatusCode::UNAUTHORIZED,
                ..
            }) => {
                tracing::debug!(%url, "Core refused the access token; renewing it");
                self.forget(&token).await;
                let token = self.access_token().await?;
                self.post(&url, Some(&token), body).await
            }
            other => other,
        }
    }

    /// The cached access token, or a new one when it is due for renewal.
    async fn access_token(&self) -> Result<String, ControlError> {
        let mut slot = self.inner.token.lock().await;
        if let Some(cached) = slot.as_ref() {
            if Instant::now() < cached.renew_at {
                return Ok(cached.value.clone());
            }
        }
        let value = self.refresh().await?;
        let lifetime = usable_for(&value, unix_now());
        tracing::debug!(
            renew_in_secs = lifetime.as_secs(),
            "got an access token from Core"
        );
        *slot = Some(CachedToken {
            value: value.clone(),
            renew_at: Instant::now() + lifetime,
        });
        Ok(value)
    }

    /// Drops the cached token if it is still `refused` (another caller may have renewed it).
    async fn forget(&self, refused: &str) {
        let mut slot = self.inner.token.lock().await;
        if slot.as_ref().is_some_and(|t| t.value == refused) {
            *slot = None;
        }
    }

    /// Exchanges the refresh token for a new access token.
    async fn refresh(&self) -> Result<String, ControlError> {
        let url = format!("{}/auth/providers/refresh", self.inner.base);
        let body = serde_json::to_vec(&Bulk {
            items: vec![RefreshItem {
                refresh_token: &self.inner.refresh_token,
            }],
        })
        .expect("the refresh body holds only a string");
        let answer = self.post(&url, None, body).await?;
        parse_refresh(&answer)
    }

    /// One POST of a JSON `body`; the answer's body when the status is 2xx.
    async fn post(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ControlError> {
        let mut request = self
            .inner
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let failed = |err: reqwest::Error| {
            let url = url.to_owned();
            if err.is_timeout() {
                ControlError::Timeout { url, err }
            } else {
                ControlError::Unreachable { url, err }
            }
        };
        let response = request.send().await.map_err(failed)?;
        let status = response.status();
        let answer = response.bytes().await.map_err(failed)?;
        if !status.is_success() {
            return Err(ControlError::Refused {
                url: url.to_owned(),
                status,
                body: excerpt(&answer),
            });
        }
        Ok(answer.to_vec())
    }
}

/// `{"items":[...]}`, UCloud's bulk request.
#[derive(Serialize)]
struct Bulk<T> {
    items: Vec<T>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RefreshItem<'a> {
    refresh_token: &'a str,
}

// No `Debug` on the answer types: they hold the access token.
#[derive(Deserialize)]
struct RefreshAnswer {
    responses: Vec<RefreshedToken>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RefreshedToken {
    access_token: String,
}

#[derive(Serialize)]
struct UpdateItem<'a> {
    id: &'a str,
    update: WireUpdate<'a>,
}

/// A `JobUpdate` as Core reads it; fields vmhost never sets are left out.
#[derive(Serialize)]
struct WireUpdate<'a> {
    state: Option<&'static str>,
    status: Option<&'a str>,
    timestamp: i64,
}

fn update_body(reports: &[CoreReport]) -> Bulk<UpdateItem<'_>> {
    Bulk {
        items: reports
            .iter()
            .map(|r| UpdateItem {
                id: &r.core_id,
                update: WireUpdate {
                    state: r.update.state.map(|s| s.as_str()),
                    status: r.update.status.as_deref(),
                    timestamp: r.update.timestamp,
                },
            })
            .collect(),
    }
}

/// The access token in Core's refresh answer.
fn parse_refresh(answer: &[u8]) -> Result<String, ControlError> {
    let bad = |why: String| ControlError::BadRefreshResponse { why };
    // serde's message may quote the answer, and the answer may hold a token: keep only
    // where parsing stopped.
    let parsed: RefreshAnswer = serde_json::from_slice(answer).map_err(|e| {
        bad(format!(
            "not the expected JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let Some(first) = parsed.responses.into_iter().next() else {
        return Err(bad("no token in `responses`".to_owned()));
    };
    if first.access_token.is_empty() {
        return Err(bad("the access token is empty".to_owned()));
    }
    Ok(first.access_token)
}

/// The `exp` claim (seconds since the epoch) of a JWT, read without verifying it.
fn jwt_exp(token: &str) -> Option<i64> {
    const BASE64URL: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = BASE64URL.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    let exp = claims.get("exp")?;
    // NumericDate may be fractional; whole seconds are enough here (and `as` saturates).
    exp.as_i64().or_else(|| {
        exp.as_f64()
            .filter(|f| f.is_finite())
            .map(|f| f.floor() as i64)
    })
}

/// How long a token received at `now` (seconds since the epoch) is used before renewal.
fn usable_for(token: &str, now: i64) -> Duration {
    let Some(exp) = jwt_exp(token) else {
        return UNREADABLE_EXP_LIFETIME;
    };
    let renew_before = i64::try_from(RENEW_BEFORE_EXP.as_secs()).unwrap_or(i64::MAX);
    let secs = exp.saturating_sub(now).saturating_sub(renew_before);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0)).min(MAX_TOKEN_LIFETIME)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The start of a refusal's body, on one line, for an error message.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(MAX_BODY_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(MAX_BODY_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::record::JobUpdate;
    use crate::jobs::state::JobState;

    fn jwt(payload: &serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.c2ln",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64(payload.to_string().as_bytes())
        )
    }

    #[test]
    fn exp_is_read_from_the_payload() {
        assert_eq!(
            jwt_exp(&jwt(
                &serde_json::json!({"exp": 1_700_000_600, "sub": "#P_vmhost"})
            )),
            Some(1_700_000_600)
        );
        assert_eq!(
            jwt_exp(&jwt(&serde_json::json!({"exp": 1_700_000_600.75}))),
            Some(1_700_000_600)
        );
    }

    #[test]
    fn exp_tolerates_base64_padding() {
        let padded = {
            let b64 = base64::engine::general_purpose::URL_SAFE;
            format!("e30.{}.sig", b64.encode(br#"{"exp":17}"#))
        };
        assert!(padded.contains('='), "the test needs a padded payload");
        assert_eq!(jwt_exp(&padded), Some(17));
    }

    #[test]
    fn unreadable_tokens_have_no_exp() {
        for token in [
            "",
            "opaque-token",
            "a.b",
            "a.b.c.d",
            "e30.!!!.sig",
            &jwt(&serde_json::json!({"iat": 1})),
            &jwt(&serde_json::json!({"exp": "soon"})),
            &jwt(&serde_json::json!([1, 2])),
        ] {
            assert_eq!(jwt_exp(token), None, "{token:?}");
        }
    }

    #[test]
    fn a_token_is_used_until_three_minutes_before_exp() {
        let now = 1_700_000_000;
        let ten_minutes = jwt(&serde_json::json!({"exp": now + 600}));
        assert_eq!(usable_for(&ten_minutes, now), Duration::from_secs(420));
        let nearly_due = jwt(&serde_json::json!({"exp": now + 100}));
        assert_eq!(usable_for(&nearly_due, now), Duration::ZERO);
        let expired = jwt(&serde_json::json!({"exp": now - 100}));
        assert_eq!(usable_for(&expired, now), Duration::ZERO);
        let forever = jwt(&serde_json::json!({"exp": i64::MAX}));
        assert_eq!(usable_for(&forever, now), MAX_TOKEN_LIFETIME);
        let far_past = jwt(&serde_json::json!({"exp": i64::MIN}));
        assert_eq!(usable_for(&far_past, now), Duration::ZERO);
    }

    #[test]
    fn a_token_without_exp_is_used_for_five_minutes() {
        assert_eq!(usable_for("opaque", 0), Duration::from_secs(300));
    }

    #[test]
    fn the_update_body_carries_core_ids_and_only_set_fields() {
        let reports = vec![
            CoreReport {
                core_id: "54112".to_owned(),
                job_id: "1".to_owned(),
                seq: 1,
                update: JobUpdate {
                    timestamp: 1000,
                    state: Some(JobState::Running),
                    status: Some("up".to_owned()),
                },
            },
            CoreReport {
                core_id: "54112".to_owned(),
                job_id: "1".to_owned(),
                seq: 2,
                update: JobUpdate {
                    timestamp: 2000,
                    state: None,
                    status: None,
                },
            },
        ];
        let body = serde_json::to_value(update_body(&reports)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"items": [
                {"id": "54112", "update": {"state": "RUNNING", "status": "up", "timestamp": 1000}},
                {"id": "54112", "update": {"state": null, "status": null, "timestamp": 2000}},
            ]})
        );
    }

    #[test]
    fn the_refresh_answer_gives_the_access_token() {
        let answer = br#"{"responses":[{"accessToken":"a.b.c","csrfToken":""}]}"#;
        assert_eq!(parse_refresh(answer).unwrap(), "a.b.c");
    }

    #[test]
    fn a_bad_refresh_answer_is_refused_without_quoting_it() {
        for answer in [
            &br#"{"responses":[]}"#[..],
            br#"{}"#,
            br#"{"responses":[{"accessToken":""}]}"#,
            br#"{"responses":[{"accessToken":12345678}]}"#,
            br#"{"responses":[{"token":"secret-token-value"}]}"#,
            b"<html>secret-token-value</html>",
        ] {
            let err = parse_refresh(answer).expect_err("unusable");
            let shown = err.to_string();
            assert!(matches!(err, ControlError::BadRefreshResponse { .. }));
            assert!(!shown.contains("secret-token-value"), "{shown}");
            assert!(!shown.contains("12345678"), "{shown}");
        }
    }

    #[test]
    fn refusal_bodies_are_cut_and_kept_on_one_line() {
        assert_eq!(excerpt(b"  {\"why\":\"no\"}\n"), "{\"why\":\"no\"}");
        assert_eq!(excerpt(b"a\nb"), "a b");
        let long = "é".repeat(MAX_BODY_CHARS + 10);
        let cut = excerpt(long.as_bytes());
        assert_eq!(cut.chars().count(), MAX_BODY_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt(&[0xff, b'x']), "\u{fffd}x");
    }

    #[test]
    fn debug_output_hides_the_refresh_token() {
        let client = CoreClient::new(&UcloudConfig {
            core_url: "http://127.0.0.1:1/".to_owned(),
            refresh_token: "refresh-secret".to_owned(),
            public_key: String::new(),
        })
        .unwrap();
        let shown = format!("{client:?}");
        assert!(shown.contains("http://127.0.0.1:1"), "{shown}");
        assert!(!shown.contains("refresh-secret"), "{shown}");
    }
}
