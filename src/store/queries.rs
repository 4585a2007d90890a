//! The SQL behind [`super::Store`]; every function runs on a connection the caller holds.

use std::path::PathBuf;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use super::{addresses, core_jobs, row_id, StoreError};
use crate::jobs::record::{JobRecord, JobUpdate};
use crate::jobs::spec::JobSpec;
use crate::jobs::state::JobState;
use crate::network::pool::AddressPool;

/// A job to insert, with the update that opens its history.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub owner: String,
    pub spec: JobSpec,
    pub fingerprint: String,
    pub created_at: i64,
    pub first_update: JobUpdate,
    /// Ids of the owner's public IPs to attach to the job.
    pub public_ips: Vec<String>,
    /// Refuse the job while the owner has an active job with the same fingerprint
    /// (`allowDuplicateJob` unset).
    pub unique: bool,
    /// Core's id for a job UCloud/Core created; `None` for the standalone API's jobs.
    pub core_id: Option<String>,
}

/// A VM a job owns (or may own: the row exists before the VM is created).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub job_id: String,
    pub rank: u32,
    pub domain: String,
    pub dir: PathBuf,
    pub overlay: PathBuf,
    pub seed: PathBuf,
    pub console_log: PathBuf,
}

/// Which jobs to list. Every `Some` narrows the result; lists match any of their values.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub owner: Option<String>,
    pub ids: Option<Vec<String>>,
    pub state: Option<JobState>,
    pub app_name: Option<String>,
    pub created_by: Option<String>,
    pub created_after: Option<i64>,
    pub created_before: Option<i64>,
    pub providers: Option<Vec<String>>,
    pub product_id: Option<String>,
    pub product_category: Option<String>,
    pub hide_product_id: Option<String>,
    pub hide_product_category: Option<String>,
    pub hide_provider: Option<String>,
    /// Free text matched against the id, the job name and the application name.
    pub text: Option<String>,
    /// Only jobs older than this id (the page cursor).
    pub before_id: Option<i64>,
    pub limit: Option<u32>,
    /// Only jobs with this duplicate-detection fingerprint.
    pub fingerprint: Option<String>,
    /// Only jobs that are not final.
    pub active_only: bool,
    /// Oldest first (the queue order) instead of newest first.
    pub oldest_first: bool,
}

const FINAL_STATES: &str = "('SUCCESS','FAILURE','EXPIRED')";

pub(super) fn agent_id(c: &mut Connection) -> Result<String, StoreError> {
    let tx = c.transaction()?;
    let existing: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'agent_id'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let id = match existing {
        Some(id) => id,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('agent_id', ?1)",
                [&id],
            )?;
            id
        }
    };
    tx.commit()?;
    Ok(id)
}

pub(super) fn insert_jobs(
    c: &mut Connection,
    jobs: &[NewJob],
    private_pool: Option<&AddressPool>,
) -> Result<Vec<String>, StoreError> {
    let tx = c.transaction()?;
    let mut ids = Vec::with_capacity(jobs.len());
    for (index, job) in jobs.iter().enumerate() {
        if job.unique {
            // In the inserting transaction, so two identical requests at once cannot both pass.
            let existing: Option<i64> = tx
                .query_row(
                    &format!(
                        "SELECT id FROM jobs WHERE owner = ?1 AND fingerprint = ?2
                         AND state NOT IN {FINAL_STATES} ORDER BY id LIMIT 1"
                    ),
                    params![job.owner, job.fingerprint],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(existing) = existing {
                return Err(StoreError::Duplicate {
                    index,
                    existing: existing.to_string(),
                });
            }
        }
        let spec = serde_json::to_string(&job.spec).map_err(|e| StoreError::Corrupt {
            id: "<new>".into(),
            why: e.to_string(),
        })?;
        tx.execute(
            "INSERT INTO jobs (owner, state, spec, fingerprint, name, app_name, app_version,
                               product_id, product_category, provider, created_at, allocation_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                job.owner,
                JobState::InQueue.as_str(),
                spec,
                job.fingerprint,
                job.spec.name,
                job.spec.application.name,
                job.spec.application.version,
                job.spec.product.id,
                job.spec.product.category,
                job.spec.product.provider,
                job.created_at,
                job.spec
                    .time_allocation
                    .map(crate::jobs::spec::SimpleDuration::as_millis),
            ],
        )?;
        let id = tx.last_insert_rowid().to_string();
        if let Some(core_id) = &job.core_id {
            core_jobs::insert(&tx, &id, core_id)?;
        }
        insert_update(&tx, &id, &job.first_update)?;
        addresses::bind_public_ips(&tx, &id, &job.owner, &job.public_ips)?;
        if let Some(pool) = private_pool {
            addresses::allocate_private(&tx, &id, job.spec.replicas(), pool)?;
        }
        ids.push(id);
    }
    tx.commit()?;
    Ok(ids)
}

fn insert_update(c: &Connection, id: &str, u: &JobUpdate) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO job_updates (job_id, seq, timestamp, state, status)
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_updates WHERE job_id = ?1), ?2, ?3, ?4)",
        params![id, u.timestamp, u.state.map(JobState::as_str), u.status],
    )?;
    Ok(())
}

pub(super) fn append_update(c: &mut Connection, id: &str, u: &JobUpdate) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    if u.state.is_some() {
        // Checked in the writing transaction: a request that read the job a moment ago (an
        // unsuspend racing the expiry) must not bring a finished job back.
        let current: Option<String> = tx
            .query_row("SELECT state FROM jobs WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()?;
        if let Some(state) = current.as_deref().and_then(JobState::parse) {
            if state.is_final() {
                return Err(StoreError::AlreadyFinal {
                    id: id.to_owned(),
                    state: state.as_str(),
                });
            }
        }
    }
    insert_update(&tx, id, u)?;
    if let Some(state) = u.state {
        // A new state completes (or supersedes) any suspend that was asked for.
        tx.execute(
            "UPDATE jobs SET state = ?2, suspend_requested = 0 WHERE id = ?1",
            params![id, state.as_str()],
        )?;
        if state == JobState::Running {
            tx.execute(
                "UPDATE jobs SET started_at = ?2 WHERE id = ?1",
                params![id, u.timestamp],
            )?;
        }
        if state.is_final() {
            tx.execute(
                "UPDATE jobs SET expires_at = NULL WHERE id = ?1",
                params![id],
            )?;
            addresses::release_job(&tx, id)?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// All or none, and only jobs still running with no terminate pending: the caller's check may
/// be stale by now (a guest powering off records SUSPENDED meanwhile, and a suspend asked of a
/// stopped job would never complete, refusing every later unsuspend).
pub(super) fn set_suspend_requested(c: &mut Connection, ids: &[String]) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    for id in ids {
        let changed = tx.execute(
            "UPDATE jobs SET suspend_requested = 1
             WHERE id = ?1 AND state = 'RUNNING' AND terminate_requested = 0",
            [id],
        )?;
        if changed == 0 {
            return Err(StoreError::NotRunning { id: id.clone() });
        }
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn set_terminate_requested(c: &mut Connection, id: &str) -> Result<(), StoreError> {
    c.execute(
        "UPDATE jobs SET terminate_requested = 1 WHERE id = ?1",
        [id],
    )?;
    Ok(())
}

const JOB_COLUMNS: &str = "id, owner, state, spec, created_at, started_at, expires_at,
     terminate_requested, allocation_ms, suspend_requested";

/// A `jobs` row before its JSON and state are decoded.
struct JobRow {
    id: i64,
    owner: String,
    state: String,
    spec: String,
    created_at: i64,
    started_at: Option<i64>,
    expires_at: Option<i64>,
    terminate_requested: bool,
    allocation_ms: Option<i64>,
    suspend_requested: bool,
}

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: row.get(0)?,
        owner: row.get(1)?,
        state: row.get(2)?,
        spec: row.get(3)?,
        created_at: row.get(4)?,
        started_at: row.get(5)?,
        expires_at: row.get(6)?,
        terminate_requested: row.get(7)?,
        allocation_ms: row.get(8)?,
        suspend_requested: row.get(9)?,
    })
}

fn hydrate(c: &Connection, row: JobRow) -> Result<JobRecord, StoreError> {
    let JobRow {
        id,
        owner,
        state,
        spec,
        created_at,
        started_at,
        expires_at,
        terminate_requested,
        allocation_ms,
        suspend_requested,
    } = row;
    let id = id.to_string();
    let corrupt = |why: String| StoreError::Corrupt {
        id: id.clone(),
        why,
    };
    let state = JobState::parse(&state).ok_or_else(|| corrupt(format!("unknown state {state}")))?;
    let spec: JobSpec = serde_json::from_str(&spec).map_err(|e| corrupt(e.to_string()))?;
    let mut stmt = c.prepare_cached(
        "SELECT timestamp, state, status FROM job_updates WHERE job_id = ?1 ORDER BY seq",
    )?;
    let updates = stmt
        .query_map([&id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?
        .map(|r| {
            let (timestamp, state, status) = r?;
            Ok(JobUpdate {
                timestamp,
                state: state.as_deref().and_then(JobState::parse),
                status,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(JobRecord {
        id,
        owner,
        state,
        spec,
        created_at,
        started_at,
        expires_at,
        terminate_requested,
        allocation_ms,
        suspend_requested,
        updates,
    })
}

pub(super) fn job(c: &mut Connection, id: &str) -> Result<Option<JobRecord>, StoreError> {
    let Some(numeric) = row_id(id) else {
        return Ok(None);
    };
    let row = c
        .query_row(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
            [numeric],
            job_from_row,
        )
        .optional()?;
    row.map(|row| hydrate(c, row)).transpose()
}

pub(super) fn jobs(c: &mut Connection, q: &JobQuery) -> Result<Vec<JobRecord>, StoreError> {
    let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut eq = |sql: &mut String, column: &str, value: Option<&String>, negate: bool| {
        if let Some(v) = value {
            let op = if negate { "<>" } else { "=" };
            sql.push_str(&format!(" AND {column} {op} ?"));
            args.push(v.clone().into());
        }
    };
    eq(&mut sql, "owner", q.owner.as_ref(), false);
    eq(&mut sql, "app_name", q.app_name.as_ref(), false);
    eq(&mut sql, "owner", q.created_by.as_ref(), false);
    eq(&mut sql, "product_id", q.product_id.as_ref(), false);
    eq(
        &mut sql,
        "product_category",
        q.product_category.as_ref(),
        false,
    );
    eq(&mut sql, "product_id", q.hide_product_id.as_ref(), true);
    eq(
        &mut sql,
        "product_category",
        q.hide_product_category.as_ref(),
        true,
    );
    eq(&mut sql, "provider", q.hide_provider.as_ref(), true);
    eq(&mut sql, "fingerprint", q.fingerprint.as_ref(), false);
    let state = q.state.map(|s| s.as_str().to_owned());
    eq(&mut sql, "state", state.as_ref(), false);
    if let Some(ids) = &q.ids {
        let numeric: Vec<i64> = ids.iter().filter_map(|i| i.trim().parse().ok()).collect();
        sql.push_str(&format!(" AND id IN ({})", placeholders(numeric.len())));
        args.extend(numeric.into_iter().map(Into::into));
    }
    if let Some(providers) = &q.providers {
        sql.push_str(&format!(
            " AND provider IN ({})",
            placeholders(providers.len())
        ));
        args.extend(providers.iter().map(|p| p.trim().to_owned().into()));
    }
    if let Some(after) = q.created_after {
        sql.push_str(" AND created_at >= ?");
        args.push(after.into());
    }
    if let Some(before) = q.created_before {
        sql.push_str(" AND created_at <= ?");
        args.push(before.into());
    }
    if let Some(text) = &q.text {
        sql.push_str(
            " AND (CAST(id AS TEXT) = ? OR name LIKE ? ESCAPE '\\' OR app_name LIKE ? ESCAPE '\\')",
        );
        let like = format!(
            "%{}%",
            text.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        args.extend([text.clone().into(), like.clone().into(), like.into()]);
    }
    if let Some(before_id) = q.before_id {
        sql.push_str(" AND id < ?");
        args.push(before_id.into());
    }
    if q.active_only {
        sql.push_str(&format!(" AND state NOT IN {FINAL_STATES}"));
    }
    sql.push_str(if q.oldest_first {
        " ORDER BY id ASC"
    } else {
        " ORDER BY id DESC"
    });
    if let Some(limit) = q.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    let rows = {
        let mut stmt = c.prepare(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), job_from_row)?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    rows.into_iter().map(|row| hydrate(c, row)).collect()
}

fn placeholders(n: usize) -> String {
    if n == 0 {
        // `IN ()` is a syntax error; NULL matches nothing, which is what an empty list means.
        return "NULL".to_owned();
    }
    vec!["?"; n].join(",")
}

pub(super) fn active_job_ids(c: &mut Connection) -> Result<Vec<String>, StoreError> {
    let mut stmt = c.prepare(&format!(
        "SELECT id FROM jobs WHERE state NOT IN {FINAL_STATES} ORDER BY id"
    ))?;
    let ids = stmt.query_map([], |r| r.get::<_, i64>(0))?;
    Ok(ids
        .map(|id| id.map(|id| id.to_string()))
        .collect::<Result<_, _>>()?)
}

pub(super) fn put_vm(c: &mut Connection, vm: &VmRecord) -> Result<(), StoreError> {
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    c.execute(
        "INSERT OR REPLACE INTO job_vms (job_id, rank, domain, dir, overlay, seed, console_log)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            vm.job_id,
            vm.rank,
            vm.domain,
            path(&vm.dir),
            path(&vm.overlay),
            path(&vm.seed),
            path(&vm.console_log)
        ],
    )?;
    Ok(())
}

fn vm_from_row(r: &Row<'_>) -> rusqlite::Result<VmRecord> {
    let path = |i| r.get::<_, String>(i).map(PathBuf::from);
    Ok(VmRecord {
        job_id: r.get::<_, i64>(0)?.to_string(),
        rank: r.get(1)?,
        domain: r.get(2)?,
        dir: path(3)?,
        overlay: path(4)?,
        seed: path(5)?,
        console_log: path(6)?,
    })
}

const VM_COLUMNS: &str = "job_id, rank, domain, dir, overlay, seed, console_log";

pub(super) fn vms(c: &mut Connection, job_id: &str) -> Result<Vec<VmRecord>, StoreError> {
    let mut stmt = c.prepare(&format!(
        "SELECT {VM_COLUMNS} FROM job_vms WHERE job_id = ?1 ORDER BY rank"
    ))?;
    let rows = stmt.query_map([job_id], vm_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn all_vms(c: &mut Connection) -> Result<Vec<VmRecord>, StoreError> {
    let mut stmt = c.prepare(&format!(
        "SELECT {VM_COLUMNS} FROM job_vms ORDER BY job_id, rank"
    ))?;
    let rows = stmt.query_map([], vm_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn delete_vm(c: &mut Connection, domain: &str) -> Result<(), StoreError> {
    c.execute("DELETE FROM job_vms WHERE domain = ?1", [domain])?;
    Ok(())
}

pub(super) fn extend_allocation(
    c: &mut Connection,
    id: &str,
    add_ms: i64,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE jobs SET allocation_ms = allocation_ms + ?2,
                         expires_at = CASE WHEN expires_at IS NULL THEN NULL ELSE expires_at + ?2 END
         WHERE id = ?1 AND allocation_ms IS NOT NULL",
        params![id, add_ms],
    )?;
    Ok(())
}

pub(super) fn set_expires_at(c: &mut Connection, id: &str, at: i64) -> Result<(), StoreError> {
    c.execute(
        "UPDATE jobs SET expires_at = ?2 WHERE id = ?1",
        params![id, at],
    )?;
    Ok(())
}
