//! Jobs UCloud/Core created: Core's id for each, and how far Core has acknowledged its history.
//!
//! Core names jobs by its own ids (`"54112"`); vmhost keeps its own row ids and maps them here.
//! A job's updates are reported in `seq` order; `reported_seq` moves only once Core accepted
//! them, so a restart or an unreachable Core delays reports but never loses or reorders them.

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction};

use super::{row_id, StoreError};
use crate::jobs::record::JobUpdate;
use crate::jobs::state::JobState;

/// One update of a Core job that Core has not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreReport {
    pub core_id: String,
    pub job_id: String,
    pub seq: u32,
    pub update: JobUpdate,
}

/// Records Core's id of a new job, in the transaction that inserts it. The job is new, so
/// only `core_id`'s UNIQUE constraint can refuse the row.
pub(super) fn insert(tx: &Transaction<'_>, job_id: &str, core_id: &str) -> Result<(), StoreError> {
    let inserted = tx.execute(
        "INSERT INTO core_jobs (job_id, core_id) VALUES (?1, ?2)",
        params![job_id, core_id],
    );
    match inserted {
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            Err(StoreError::CoreIdTaken {
                core_id: core_id.to_owned(),
            })
        }
        other => other.map(drop).map_err(StoreError::from),
    }
}

pub(super) fn job_id_for(c: &mut Connection, core_id: &str) -> Result<Option<String>, StoreError> {
    let id: Option<i64> = c
        .query_row(
            "SELECT job_id FROM core_jobs WHERE core_id = ?1",
            [core_id],
            |row| row.get(0),
        )
        .optional()?;
    Ok(id.map(|id| id.to_string()))
}

pub(super) fn core_id_of(c: &mut Connection, job_id: &str) -> Result<Option<String>, StoreError> {
    let Some(id) = row_id(job_id) else {
        return Ok(None);
    };
    Ok(c.query_row(
        "SELECT core_id FROM core_jobs WHERE job_id = ?1",
        [id],
        |row| row.get(0),
    )
    .optional()?)
}

pub(super) fn unreported(c: &mut Connection, limit: usize) -> Result<Vec<CoreReport>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT k.core_id, u.job_id, u.seq, u.timestamp, u.state, u.status
         FROM core_jobs k JOIN job_updates u ON u.job_id = k.job_id
         WHERE u.seq > k.reported_seq
         ORDER BY u.job_id, u.seq
         LIMIT ?1",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map([limit], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, u32>(2)?,
            row.get::<_, i64>(3)?,
            row.get::<_, Option<String>>(4)?,
            row.get::<_, Option<String>>(5)?,
        ))
    })?;
    let mut reports = Vec::new();
    for row in rows {
        let (core_id, job_id, seq, timestamp, state, status) = row?;
        let state = match state {
            Some(s) => Some(JobState::parse(&s).ok_or_else(|| StoreError::Corrupt {
                id: job_id.to_string(),
                why: format!("unknown state {s:?}"),
            })?),
            None => None,
        };
        reports.push(CoreReport {
            core_id,
            job_id: job_id.to_string(),
            seq,
            update: JobUpdate {
                timestamp,
                state,
                status,
            },
        });
    }
    Ok(reports)
}

pub(super) fn mark_reported(
    c: &mut Connection,
    acknowledged: &[(String, u32)],
) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    for (job_id, seq) in acknowledged {
        // Never backwards: two reporters (a restart overlapping) may acknowledge out of order.
        tx.execute(
            "UPDATE core_jobs SET reported_seq = MAX(reported_seq, ?2) WHERE job_id = ?1",
            params![job_id, seq],
        )?;
    }
    tx.commit()?;
    Ok(())
}
