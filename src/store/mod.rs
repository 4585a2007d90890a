//! The durable store: jobs, their update history, and the host resources each job owns.
//!
//! Embedded SQLite in WAL mode with `synchronous=FULL`: every state change is one
//! transaction, so a `kill -9` at any point leaves either the old or the new state. The
//! `job_vms` rows are written *before* a domain, overlay or seed is created (a ghost record, as
//! KubeVirt does), so startup reconciliation always knows what may exist on the host.
//!
//! One connection behind a mutex; callers use the async methods, which run the SQL on the
//! blocking pool. Schema versions live in `schema`.

mod addresses;
mod core_jobs;
mod queries;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use addresses::{AddressedVm, JobAddresses};
pub use core_jobs::CoreReport;
pub use queries::{JobQuery, NewJob, VmRecord};

use crate::jobs::record::{JobRecord, JobUpdate};
use crate::network::config::PublicPoolConfig;
use crate::network::ip::{FirewallSpec, PublicIpRecord, PublicIpSpec};
use crate::network::pool::AddressPool;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        err: rusqlite::Error,
    },
    #[error("the store schema version {found} is newer than this vmhost understands ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("store query failed")]
    Sql(#[from] rusqlite::Error),
    #[error("stored job {id} is corrupt: {why}")]
    Corrupt { id: String, why: String },
    #[error("no address is left in {pool}")]
    PoolExhausted { pool: String },
    #[error("public IP {id} does not exist")]
    AddressUnknown { id: String },
    #[error("public IP {id} is currently in use by job {job}")]
    AddressInUse { id: String, job: String },
    #[error("UCloud job {core_id} already exists here")]
    CoreIdTaken { core_id: String },
    #[error("job {id} is not running")]
    NotRunning { id: String },
    #[error("job {id} is already {state}")]
    AlreadyFinal { id: String, state: &'static str },
    #[error("item {index}: an identical job ({existing}) is already active; set allowDuplicateJob to start another")]
    Duplicate { index: usize, existing: String },
    #[error("store worker failed")]
    Worker(#[from] tokio::task::JoinError),
}

/// The row id behind a job or public IP id, which is only ever written in canonical decimal:
/// `"01"` or `"+1"` would reach row 1 under another name, and every later step keyed by the
/// name (runners, consoles, followers) would then take it for a second resource.
fn row_id(id: &str) -> Option<i64> {
    id.parse::<i64>()
        .ok()
        .filter(|&n| n > 0 && n.to_string() == id)
}

/// Cheap-to-clone handle to the SQLite store.
#[derive(Clone, Debug)]
pub struct Store {
    /// Held only for the duration of one statement batch; never across an `.await`.
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |err| StoreError::Open {
            path: path.to_owned(),
            err,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        schema::migrate(&mut conn)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A poisoned lock means a panic mid-statement; SQLite rolled the transaction back,
            // so the connection itself is still consistent.
            let mut guard = conn.lock().unwrap_or_else(|poison| poison.into_inner());
            f(&mut guard)
        })
        .await?
    }

    /// The identity stamped into every domain this vmhost creates; made once per store.
    pub async fn agent_id(&self) -> Result<String, StoreError> {
        self.with(queries::agent_id).await
    }

    /// Inserts jobs with their first update in one transaction, binding their public IPs and
    /// giving each rank a private address from `private_pool`; returns their ids in order.
    pub async fn insert_jobs(
        &self,
        jobs: Vec<NewJob>,
        private_pool: Option<AddressPool>,
    ) -> Result<Vec<String>, StoreError> {
        self.with(move |c| queries::insert_jobs(c, &jobs, private_pool.as_ref()))
            .await
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| queries::job(c, &id)).await
    }

    /// One page of jobs matching `query`, newest first.
    pub async fn jobs(&self, query: JobQuery) -> Result<Vec<JobRecord>, StoreError> {
        self.with(move |c| queries::jobs(c, &query)).await
    }

    /// Ids of every job that is not final.
    pub async fn active_job_ids(&self) -> Result<Vec<String>, StoreError> {
        self.with(queries::active_job_ids).await
    }

    /// Appends an update (and applies its state, `started_at` when it enters RUNNING).
    pub async fn append_update(&self, id: &str, update: JobUpdate) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with(move |c| queries::append_update(c, &id, &update))
            .await
    }

    /// Records that a suspend was requested; the next state update clears it.
    pub async fn set_suspend_requested(&self, ids: &[String]) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.with(move |c| queries::set_suspend_requested(c, &ids))
            .await
    }

    /// Records that a terminate was requested, so a restart finishes it.
    pub async fn set_terminate_requested(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with(move |c| queries::set_terminate_requested(c, &id))
            .await
    }

    /// Adds to a job's time allocation and, once it has one, its deadline.
    pub async fn extend_allocation(&self, id: &str, add_ms: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with(move |c| queries::extend_allocation(c, &id, add_ms))
            .await
    }

    pub async fn set_expires_at(&self, id: &str, at: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with(move |c| queries::set_expires_at(c, &id, at))
            .await
    }

    pub async fn put_vm(&self, vm: VmRecord) -> Result<(), StoreError> {
        self.with(move |c| queries::put_vm(c, &vm)).await
    }

    pub async fn vms(&self, job_id: &str) -> Result<Vec<VmRecord>, StoreError> {
        let id = job_id.to_owned();
        self.with(move |c| queries::vms(c, &id)).await
    }

    pub async fn delete_vm(&self, domain: &str) -> Result<(), StoreError> {
        let domain = domain.to_owned();
        self.with(move |c| queries::delete_vm(c, &domain)).await
    }

    /// Allocates one address per item from its pool, all in one transaction.
    pub async fn insert_public_ips(
        &self,
        owner: String,
        items: Vec<(PublicIpSpec, PublicPoolConfig)>,
        created_at: i64,
    ) -> Result<Vec<PublicIpRecord>, StoreError> {
        self.with(move |c| addresses::insert_public_ips(c, &owner, &items, created_at))
            .await
    }

    pub async fn public_ip(&self, id: &str) -> Result<Option<PublicIpRecord>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| addresses::public_ip(c, &id)).await
    }

    /// The owner's public IPs, newest first, with ids below `before_id`.
    pub async fn public_ips(
        &self,
        owner: String,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<PublicIpRecord>, StoreError> {
        self.with(move |c| addresses::public_ips(c, &owner, before_id, limit))
            .await
    }

    /// Deletes the owner's addresses, all or none; none may be attached to an active job.
    pub async fn delete_public_ips(
        &self,
        owner: String,
        ids: Vec<String>,
    ) -> Result<(), StoreError> {
        self.with(move |c| addresses::delete_public_ips(c, &owner, &ids))
            .await
    }

    /// Replaces the firewalls of the owner's addresses, all or none; true if any is attached.
    pub async fn set_public_ip_firewalls(
        &self,
        owner: String,
        items: Vec<(String, FirewallSpec)>,
    ) -> Result<bool, StoreError> {
        self.with(move |c| addresses::set_public_ip_firewalls(c, &owner, &items))
            .await
    }

    /// A job's private addresses and attached public IPs.
    pub async fn job_addresses(&self, job_id: &str) -> Result<JobAddresses, StoreError> {
        let id = job_id.to_owned();
        self.with(move |c| addresses::job_addresses(c, &id)).await
    }

    /// Every VM record with its job's owner and addresses (for the firewall).
    pub async fn addressed_vms(&self) -> Result<Vec<AddressedVm>, StoreError> {
        self.with(addresses::addressed_vms).await
    }

    /// Every VM record of every job (for reconciliation).
    pub async fn all_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.with(queries::all_vms).await
    }

    /// vmhost's id of the job Core calls `core_id`.
    pub async fn job_id_for_core(&self, core_id: &str) -> Result<Option<String>, StoreError> {
        let core_id = core_id.to_owned();
        self.with(move |c| core_jobs::job_id_for(c, &core_id)).await
    }

    /// Core's id of job `job_id`, if Core created it.
    pub async fn core_id_of(&self, job_id: &str) -> Result<Option<String>, StoreError> {
        let job_id = job_id.to_owned();
        self.with(move |c| core_jobs::core_id_of(c, &job_id)).await
    }

    /// Updates of Core's jobs that Core has not acknowledged yet, oldest first per job, at
    /// most `limit`.
    pub async fn unreported_updates(&self, limit: usize) -> Result<Vec<CoreReport>, StoreError> {
        self.with(move |c| core_jobs::unreported(c, limit)).await
    }

    /// Core acknowledged each job's updates up to the given `seq`.
    pub async fn mark_reported(&self, acknowledged: Vec<(String, u32)>) -> Result<(), StoreError> {
        self.with(move |c| core_jobs::mark_reported(c, &acknowledged))
            .await
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
