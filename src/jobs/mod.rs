//! Jobs: the front door ([`JobManager`]) and one runner task per active job.
//!
//! The manager validates requests, records them in the store and hands each active job to its
//! runner (see `runner`); the runner is the only code that changes that job's VMs. Reads go
//! straight to the store. Every change to a job is published on a broadcast channel that
//! `follow` streams from.
//!
//! Ordering rule: the store is written *before* the reply, and before the host is touched, so
//! a crash at any point is repaired by [`reconcile`] on the next start.

pub mod capacity;
pub mod console;
mod manager;
mod naming;
pub mod reconcile;
pub mod record;
mod runner;
mod scheduler;
pub mod spec;
pub mod state;

pub use crate::ucloud::{now_millis, Owner};
pub use manager::{JobChange, JobManager, JobManagerDeps, NewJobRequest, Utilization};
pub use naming::VmNaming;
pub use record::{JobRecord, JobUpdate};
pub use spec::{JobSpec, LaunchPlan, SpecError};
pub use state::{JobState, StopKind};

/// The status messages users see, in one place.
pub mod messages {
    pub const QUEUED: &str = "Your job is now waiting in the queue!";
    pub const RUNNING: &str = "Your job is now running!";
    pub const CANCELLED: &str = "Your job has been cancelled!";
    pub const POWERED_OFF_INSIDE: &str = "The virtual machine was powered off from inside";
    pub const POWERED_OFF_HOST: &str =
        "The virtual machine was powered off from the host, outside vmhost; its disk is kept";
    pub const CRASHED: &str =
        "The virtual machine stopped unexpectedly (QEMU crashed or was killed); its disk is kept";
    pub const VANISHED: &str =
        "The virtual machine disappeared from the hypervisor; vmhost cleaned up its files";
    pub const EXPIRED: &str = "Your job has expired: its time allocation ran out";
    pub const RESTARTED_ON_EXIT: &str =
        "The virtual machine powered itself off and was started again (restartOnExit)";

    pub fn attached_public_ip(address: std::net::Ipv4Addr) -> String {
        format!("Attached public IP {address}")
    }

    pub fn private_address(address: std::net::Ipv4Addr, rank: Option<u32>) -> String {
        match rank {
            Some(rank) => format!("Rank {rank} has private address {address}"),
            None => format!("The virtual machine has private address {address}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job {id} does not exist")]
    NotFound { id: String },
    #[error("item {index}: {source}")]
    InvalidSpec {
        index: usize,
        #[source]
        source: SpecError,
    },
    #[error("item {index}: an identical job ({existing}) is already active; set allowDuplicateJob to start another")]
    Duplicate { index: usize, existing: String },
    #[error("job {id}: {denied}")]
    Denied { id: String, denied: state::Denied },
    #[error("job {id} has no time allocation to extend")]
    NoDeadline { id: String },
    #[error("{0}")]
    BadRequest(String),
    /// The request is valid but what it needs is taken (an address in use, a full pool).
    #[error("{0}")]
    Conflict(String),
    #[error("the job runner is busy; retry shortly")]
    Busy,
    #[error("the hypervisor refused")]
    Backend(#[source] Box<crate::backend::BackendError>),
    /// Several items of a bulk request were refused; nothing was changed.
    #[error("{}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Bulk { errors: Vec<JobError> },
    #[error(transparent)]
    Store(crate::store::StoreError),
}

impl From<crate::store::StoreError> for JobError {
    /// The store decides two refusals inside its transactions; they are the caller's errors.
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::AlreadyFinal { id, .. } => JobError::Denied {
                id,
                denied: state::Denied::AlreadyFinal,
            },
            StoreError::Duplicate { index, existing } => JobError::Duplicate { index, existing },
            StoreError::NotRunning { id } => JobError::Denied {
                id,
                denied: state::Denied::NotRunning,
            },
            other => JobError::Store(other),
        }
    }
}

impl From<crate::backend::BackendError> for JobError {
    fn from(e: crate::backend::BackendError) -> Self {
        JobError::Backend(Box::new(e))
    }
}
