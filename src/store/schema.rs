//! Versioned schema migrations, tracked in SQLite's `user_version`.
//!
//! A migration is appended, never edited: a store written by an older vmhost is upgraded step
//! by step inside one transaction each; a store from a newer vmhost is refused.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: jobs, their updates, the VMs they own, and agent metadata.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE jobs (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        owner               TEXT    NOT NULL,
        state               TEXT    NOT NULL,
        spec                TEXT    NOT NULL,
        fingerprint         TEXT    NOT NULL,
        name                TEXT,
        app_name            TEXT    NOT NULL,
        app_version         TEXT    NOT NULL,
        product_id          TEXT    NOT NULL,
        product_category    TEXT    NOT NULL,
        provider            TEXT    NOT NULL,
        created_at          INTEGER NOT NULL,
        started_at          INTEGER,
        expires_at          INTEGER,
        allocation_ms       INTEGER,
        terminate_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_by_owner ON jobs (owner, id);
    CREATE INDEX jobs_by_state ON jobs (state);
    CREATE TABLE job_updates (
        job_id    INTEGER NOT NULL REFERENCES jobs (id),
        seq       INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        state     TEXT,
        status    TEXT,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE job_vms (
        job_id      INTEGER NOT NULL REFERENCES jobs (id),
        rank        INTEGER NOT NULL,
        domain      TEXT    NOT NULL UNIQUE,
        dir         TEXT    NOT NULL,
        overlay     TEXT    NOT NULL,
        seed        TEXT    NOT NULL,
        console_log TEXT    NOT NULL,
        PRIMARY KEY (job_id, rank)
    );
    "#,
    // 2: a suspend in progress survives a restart.
    r#"
    ALTER TABLE jobs ADD COLUMN suspend_requested INTEGER NOT NULL DEFAULT 0;
    "#,
    // 3: public IPs (bound to at most one active job) and the private address of each VM.
    // Addresses are IPv4 as integers; the UNIQUE constraints make double allocation impossible.
    r#"
    CREATE TABLE public_ips (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        owner      TEXT    NOT NULL,
        pool       TEXT    NOT NULL,
        address    INTEGER NOT NULL,
        spec       TEXT    NOT NULL,
        bound_job  INTEGER REFERENCES jobs (id),
        created_at INTEGER NOT NULL,
        UNIQUE (pool, address)
    );
    CREATE INDEX public_ips_by_owner ON public_ips (owner, id);
    CREATE INDEX public_ips_by_job ON public_ips (bound_job);
    CREATE TABLE private_addresses (
        job_id  INTEGER NOT NULL REFERENCES jobs (id),
        rank    INTEGER NOT NULL,
        address INTEGER NOT NULL UNIQUE,
        PRIMARY KEY (job_id, rank)
    );
    "#,
    // 4: jobs UCloud/Core created, under Core's id, and how much of each job's history Core
    // has acknowledged (`job_updates.seq`).
    r#"
    CREATE TABLE core_jobs (
        job_id       INTEGER PRIMARY KEY REFERENCES jobs (id),
        core_id      TEXT    NOT NULL UNIQUE,
        reported_seq INTEGER NOT NULL DEFAULT 0
    );
    "#,
];

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = i64::try_from(MIGRATIONS.len()).expect("a handful of migrations");
    let found: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (version, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_idempotent_and_newer_stores_are_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, i64::try_from(MIGRATIONS.len()).unwrap());
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
