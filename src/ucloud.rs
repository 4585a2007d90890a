//! Small UCloud shapes shared by jobs, public IPs and consoles: who a request acts for, a
//! product reference, the error body, and the API's timestamp unit.

use serde::{Deserialize, Serialize};

/// The user a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(pub String);

/// `ProductReference`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductRef {
    pub id: String,
    pub category: String,
    pub provider: String,
}

/// Milliseconds since the epoch, the timestamp unit of the UCloud API.
pub fn now_millis() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// UCloud's error body: `{"why", "errorCode", "statusCode"}`.
pub fn error_body(status: u16, error_code: &str, why: &str) -> serde_json::Value {
    serde_json::json!({ "why": why, "errorCode": error_code, "statusCode": status })
}
