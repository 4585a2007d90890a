//! [`JobManager`]: validates requests, writes the store, and routes work to job runners.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};

use super::runner::{self, RunnerMsg};
use super::spec::{self, SimpleDuration};
use super::state::{self, JobEvent};
use super::{messages, now_millis, JobError, JobRecord, JobSpec, JobUpdate, VmNaming};
use crate::backend::{Accel, VmBackend};
use crate::cloud_init::SeedTemplates;
use crate::config::Config;
use crate::images::{Catalog, ImageCache};
use crate::store::{JobQuery, NewJob, Store, VmRecord};

/// The user a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(pub String);

/// An update appended to a job, as published to followers.
#[derive(Debug, Clone)]
pub struct JobChange {
    pub job_id: String,
    pub update: JobUpdate,
}

/// Resources held by running jobs and the queue length.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub running: u32,
    pub pending: u32,
    pub cpu: u32,
    pub memory_gib: u64,
}

/// Everything the manager and its runners need.
pub struct JobManagerDeps {
    pub config: Arc<Config>,
    pub store: Store,
    pub backend: Arc<dyn VmBackend>,
    pub catalog: Arc<Catalog>,
    pub images: ImageCache,
    pub templates: SeedTemplates,
    pub accel: Accel,
    pub naming: VmNaming,
}

/// Runner queues are small: a runner that falls behind sheds load as `JobError::Busy`.
const RUNNER_QUEUE: usize = 16;

pub(super) struct Inner {
    pub(super) deps: JobManagerDeps,
    /// Sender side of each live runner's queue; the runner removes its entry when it ends.
    runners: Mutex<HashMap<String, mpsc::Sender<RunnerMsg>>>,
    /// Every appended update; `follow` subscribes. Lagging receivers re-read the store.
    changes: broadcast::Sender<JobChange>,
}

/// Cheap-to-clone handle; see the module docs of [`crate::jobs`].
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JobManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobManager").finish_non_exhaustive()
    }
}

impl Inner {
    /// Appends an update to the store, then tells followers.
    pub(super) async fn record(
        &self,
        job_id: &str,
        state: Option<state::JobState>,
        status: &str,
    ) -> Result<(), JobError> {
        let update = JobUpdate {
            timestamp: now_millis(),
            state,
            status: Some(status.to_owned()),
        };
        self.deps
            .store
            .append_update(job_id, update.clone())
            .await?;
        let _ = self.changes.send(JobChange {
            job_id: job_id.to_owned(),
            update,
        });
        Ok(())
    }

    pub(super) fn runner_finished(&self, job_id: &str) {
        self.runners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(job_id);
    }
}

impl JobManager {
    pub fn new(deps: JobManagerDeps) -> JobManager {
        let (changes, _) = broadcast::channel(1024);
        JobManager {
            inner: Arc::new(Inner {
                deps,
                runners: Mutex::new(HashMap::new()),
                changes,
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.deps.config
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.deps.catalog
    }

    pub fn backend(&self) -> &Arc<dyn VmBackend> {
        &self.inner.deps.backend
    }

    pub(super) fn store(&self) -> &Store {
        &self.inner.deps.store
    }

    pub(super) fn naming(&self) -> &VmNaming {
        &self.inner.deps.naming
    }

    pub(super) async fn remove_leftover(&self, vm: &VmRecord) -> Result<(), JobError> {
        runner::remove_vm(&self.inner, vm).await
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobChange> {
        self.inner.changes.subscribe()
    }

    /// Validates every item first; only if all are valid are they stored (one transaction) and
    /// started. A refused request creates nothing.
    pub async fn create(
        &self,
        owner: &Owner,
        specs: Vec<JobSpec>,
    ) -> Result<Vec<String>, JobError> {
        let deps = &self.inner.deps;
        if specs.is_empty() {
            return Err(JobError::BadRequest(
                "items must hold at least one job".into(),
            ));
        }
        let mut new_jobs = Vec::with_capacity(specs.len());
        let created_at = now_millis();
        for (index, spec) in specs.into_iter().enumerate() {
            spec::validate(&spec, &deps.config, &deps.catalog)
                .map_err(|source| JobError::InvalidSpec { index, source })?;
            let fingerprint = spec.fingerprint();
            if !spec.allow_duplicate_job.unwrap_or(false) {
                let in_request = new_jobs
                    .iter()
                    .any(|j: &NewJob| j.fingerprint == fingerprint);
                let query = JobQuery {
                    owner: Some(owner.0.clone()),
                    fingerprint: Some(fingerprint.clone()),
                    active_only: true,
                    limit: Some(1),
                    ..JobQuery::default()
                };
                let existing = deps.store.jobs(query).await?;
                if in_request || !existing.is_empty() {
                    let existing = existing
                        .first()
                        .map_or("in this request".into(), |j| j.id.clone());
                    return Err(JobError::Duplicate { index, existing });
                }
            }
            let first_update = JobUpdate {
                timestamp: created_at,
                state: Some(state::JobState::InQueue),
                status: Some(messages::QUEUED.to_owned()),
            };
            new_jobs.push(NewJob {
                owner: owner.0.clone(),
                spec,
                fingerprint,
                created_at,
                first_update,
            });
        }
        let firsts: Vec<JobUpdate> = new_jobs.iter().map(|j| j.first_update.clone()).collect();
        let ids = deps.store.insert_jobs(new_jobs).await?;
        for (id, update) in ids.iter().zip(firsts) {
            tracing::info!(job_id = %id, owner = %owner.0, "job accepted");
            let _ = self.inner.changes.send(JobChange {
                job_id: id.clone(),
                update,
            });
            self.ensure_runner(id);
        }
        Ok(ids)
    }

    /// The job, if it exists and belongs to `owner` (another user's job is "not found").
    pub async fn retrieve(&self, owner: &Owner, id: &str) -> Result<JobRecord, JobError> {
        match self.inner.deps.store.job(id).await? {
            Some(job) if job.owner == owner.0 => Ok(job),
            _ => Err(JobError::NotFound { id: id.to_owned() }),
        }
    }

    /// Jobs of `owner` matching `query` (its `owner` field is overwritten).
    pub async fn browse(
        &self,
        owner: &Owner,
        mut query: JobQuery,
    ) -> Result<Vec<JobRecord>, JobError> {
        query.owner = Some(owner.0.clone());
        Ok(self.inner.deps.store.jobs(query).await?)
    }

    /// Requests termination of every listed job; all must exist, be the owner's and be active.
    pub async fn terminate(&self, owner: &Owner, ids: &[String]) -> Result<(), JobError> {
        for id in ids {
            let job = self.retrieve(owner, id).await?;
            state::transition(job.state, JobEvent::TerminateRequested).map_err(|denied| {
                JobError::Denied {
                    id: id.clone(),
                    denied,
                }
            })?;
        }
        for id in ids {
            self.inner.deps.store.set_terminate_requested(id).await?;
            tracing::info!(job_id = %id, "terminate requested");
            self.send(id, RunnerMsg::Wake);
        }
        Ok(())
    }

    /// Adds time to each job's deadline; all must have one and be active.
    pub async fn extend(
        &self,
        owner: &Owner,
        items: &[(String, SimpleDuration)],
    ) -> Result<(), JobError> {
        let mut jobs = Vec::with_capacity(items.len());
        for (id, _) in items {
            let job = self.retrieve(owner, id).await?;
            if job.state.is_final() {
                return Err(JobError::Denied {
                    id: id.clone(),
                    denied: state::Denied::AlreadyFinal,
                });
            }
            if job.spec.time_allocation.is_none() {
                return Err(JobError::NoDeadline { id: id.clone() });
            }
            jobs.push(job);
        }
        for (job, (_, by)) in jobs.iter().zip(items) {
            self.inner
                .deps
                .store
                .extend_allocation(&job.id, by.as_millis())
                .await?;
            let status = format!(
                "The time allocation was extended by {}",
                describe_duration(by)
            );
            self.inner.record(&job.id, None, &status).await?;
            self.send(&job.id, RunnerMsg::Wake);
        }
        Ok(())
    }

    /// What running jobs use on this host, and how many wait.
    pub async fn usage(&self) -> Result<Usage, JobError> {
        let query = JobQuery {
            active_only: true,
            ..JobQuery::default()
        };
        let mut usage = Usage::default();
        for job in self.inner.deps.store.jobs(query).await? {
            match job.state {
                state::JobState::Running => {
                    usage.running += 1;
                    if let Some(p) = self
                        .config()
                        .product(&job.spec.product.id, &job.spec.product.category)
                    {
                        usage.cpu += p.cpu * job.spec.replicas();
                        usage.memory_gib +=
                            u64::from(p.memory_in_gigs) * u64::from(job.spec.replicas());
                    }
                }
                state::JobState::InQueue => usage.pending += 1,
                _ => {}
            }
        }
        Ok(usage)
    }

    /// Console log files of a job's VMs, by rank.
    pub async fn console_logs(&self, id: &str) -> Result<Vec<VmRecord>, JobError> {
        Ok(self.inner.deps.store.vms(id).await?)
    }

    /// Starts a runner for every active job (used once at startup, after reconciliation).
    pub async fn resume_active_jobs(&self) -> Result<usize, JobError> {
        let ids = self.inner.deps.store.active_job_ids().await?;
        for id in &ids {
            self.ensure_runner(id);
        }
        Ok(ids.len())
    }

    /// Forwards hypervisor events to the runner of the job that owns the domain.
    pub fn spawn_event_router(&self) -> tokio::task::JoinHandle<()> {
        let mut events = self.inner.deps.backend.subscribe();
        let manager = self.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if let Some((job_id, _)) =
                            manager.inner.deps.naming.parse_domain(event.name())
                        {
                            manager.send(&job_id, RunnerMsg::Vm(event));
                        }
                    }
                    // Lost events are covered by every runner's periodic sync.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            lost = n,
                            "hypervisor events lagged; relying on periodic sync"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    }

    fn ensure_runner(&self, id: &str) -> mpsc::Sender<RunnerMsg> {
        let mut runners = self.inner.runners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = runners.get(id).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(RUNNER_QUEUE);
        runners.insert(id.to_owned(), tx.clone());
        tokio::spawn(runner::run(self.inner.clone(), id.to_owned(), rx));
        tx
    }

    /// Wakes or informs a job's runner. A full queue is fine to drop: the runner re-reads the
    /// store after every message, so the newest state is seen anyway.
    fn send(&self, id: &str, msg: RunnerMsg) {
        let is_active = self
            .inner
            .runners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id);
        if !is_active && !matches!(msg, RunnerMsg::Wake) {
            return;
        }
        let _ = self.ensure_runner(id).try_send(msg);
    }
}

fn describe_duration(d: &SimpleDuration) -> String {
    format!("{:02}:{:02}:{:02}", d.hours, d.minutes, d.seconds)
}
