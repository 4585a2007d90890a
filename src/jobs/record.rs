//! A job as the store keeps it: its specification, state and history.

use serde::{Deserialize, Serialize};

use super::spec::JobSpec;
use super::state::JobState;

/// One entry of a job's history (`JobUpdate` on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobUpdate {
    /// Milliseconds since the epoch.
    pub timestamp: i64,
    pub state: Option<JobState>,
    pub status: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub owner: String,
    pub state: JobState,
    pub spec: JobSpec,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub terminate_requested: bool,
    /// The time allocation including extensions, in milliseconds.
    pub allocation_ms: Option<i64>,
    /// A suspend was asked for and has not completed yet.
    pub suspend_requested: bool,
    pub updates: Vec<JobUpdate>,
}
