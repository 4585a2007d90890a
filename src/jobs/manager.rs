//! [`JobManager`]: validates requests, writes the store, and routes work to job runners.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};

use super::capacity::Resources;
use super::runner::{self, RunnerMsg};
use super::spec::{self, SimpleDuration};
use super::state::{self, JobEvent};
use super::{messages, now_millis, JobError, JobRecord, JobSpec, JobUpdate, SpecError, VmNaming};
use crate::backend::{Accel, VmBackend};
use crate::cloud_init::SeedTemplates;
use crate::config::Config;
use crate::images::{Catalog, ImageCache};
use crate::network::guard::FirewallGuard;
use crate::store::{JobQuery, NewJob, Store, StoreError, VmRecord};
use crate::ucloud::Owner;

/// An update appended to a job, as published to followers.
#[derive(Debug, Clone)]
pub struct JobChange {
    pub job_id: String,
    pub update: JobUpdate,
}

/// The host's schedulable capacity, what running jobs use of it, and the queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Utilization {
    pub capacity: Resources,
    pub used: Resources,
    pub running: u32,
    pub pending: u32,
}

/// One job to create: for whom, what, and (for a job UCloud/Core created) Core's id.
#[derive(Debug, Clone)]
pub struct NewJobRequest {
    pub owner: Owner,
    pub spec: JobSpec,
    pub core_id: Option<String>,
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
    /// Keeps the host firewall equal to the VMs and addresses in the store.
    pub guard: Arc<FirewallGuard>,
}

/// A live runner: its queue, and its task for [`JobManager::halt`].
struct RunnerHandle {
    tx: mpsc::Sender<RunnerMsg>,
    task: tokio::task::AbortHandle,
}

/// Runner queues are small: a runner that falls behind sheds load as `JobError::Busy`.
const RUNNER_QUEUE: usize = 16;

pub(super) struct Inner {
    pub(super) deps: JobManagerDeps,
    /// Sender side of each live runner's queue; the runner removes its entry when it ends.
    runners: Mutex<HashMap<String, RunnerHandle>>,
    /// Background tasks besides the runners (the event router), for [`JobManager::halt`].
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Every appended update; `follow` subscribes. Lagging receivers re-read the store.
    changes: broadcast::Sender<JobChange>,
    /// Queued jobs the scheduler let through, until their VMs run (or fail to start).
    pub(super) admitted: Mutex<HashSet<String>>,
    /// Serialises scheduling rounds so two rounds never admit into the same free room.
    pub(super) scheduling: tokio::sync::Mutex<()>,
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

    pub(super) fn ensure_runner(self: &Arc<Self>, id: &str) -> mpsc::Sender<RunnerMsg> {
        let mut runners = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(runner) = runners.get(id).filter(|r| !r.tx.is_closed()) {
            return runner.tx.clone();
        }
        let (tx, rx) = mpsc::channel(RUNNER_QUEUE);
        let task = tokio::spawn(runner::run(self.clone(), id.to_owned(), rx)).abort_handle();
        runners.insert(
            id.to_owned(),
            RunnerHandle {
                tx: tx.clone(),
                task,
            },
        );
        tx
    }

    /// Makes the job's runner re-read the store, starting one if the job has none.
    pub(super) fn wake(self: &Arc<Self>, id: &str) {
        self.send(id, RunnerMsg::Wake);
    }

    /// Informs a job's runner. A full queue is fine to drop: the runner re-reads the store
    /// after every message, so the newest state is seen anyway. Events for jobs without a
    /// runner (final jobs) are dropped.
    pub(super) fn send(self: &Arc<Self>, id: &str, msg: RunnerMsg) {
        let is_active = self
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

impl JobManager {
    pub fn new(deps: JobManagerDeps) -> JobManager {
        let (changes, _) = broadcast::channel(1024);
        JobManager {
            inner: Arc::new(Inner {
                deps,
                runners: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
                changes,
                admitted: Mutex::new(HashSet::new()),
                scheduling: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The store, for the id maps and reports that sit beside the jobs (UCloud/Core's ids).
    pub fn store(&self) -> &Store {
        &self.inner.deps.store
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
        let items = specs
            .into_iter()
            .map(|spec| NewJobRequest {
                owner: owner.clone(),
                spec,
                core_id: None,
            })
            .collect();
        self.create_requests(items).await
    }

    /// [`Self::create`] for jobs of several owners, and for jobs UCloud/Core created under its
    /// own ids (a Core id that already names a job here is a conflict).
    pub async fn create_requests(
        &self,
        items: Vec<NewJobRequest>,
    ) -> Result<Vec<String>, JobError> {
        let deps = &self.inner.deps;
        if items.is_empty() {
            return Err(JobError::BadRequest(
                "items must hold at least one job".into(),
            ));
        }
        let mut new_jobs = Vec::with_capacity(items.len());
        let created_at = now_millis();
        let host_total = self.schedulable().await;
        for (index, item) in items.into_iter().enumerate() {
            let NewJobRequest {
                owner,
                spec,
                core_id,
            } = item;
            let owner = &owner;
            let plan = spec::validate(&spec, &deps.config, &deps.catalog)
                .and_then(|plan| spec::check_user_data(&plan, &deps.templates).map(|()| plan))
                .map_err(|source| JobError::InvalidSpec { index, source })?;
            for peer in &plan.peers {
                self.check_peer(owner, index, peer).await?;
            }
            let demand = super::scheduler::demand(&deps.config, &deps.catalog, &spec);
            if host_total.is_some_and(|total| !demand.fits_in(total)) {
                let why = format!("the job needs {demand}, more than this host can ever offer");
                return Err(JobError::InvalidSpec {
                    index,
                    source: SpecError::Invalid(why),
                });
            }
            let fingerprint = spec.fingerprint();
            let unique = !spec.allow_duplicate_job.unwrap_or(false);
            // Against active jobs the store checks, in the transaction that inserts.
            if unique
                && new_jobs
                    .iter()
                    .any(|j: &NewJob| j.fingerprint == fingerprint)
            {
                return Err(JobError::Duplicate {
                    index,
                    existing: "in this request".into(),
                });
            }
            for ip in &plan.public_ips {
                if let Some(other) = new_jobs.iter().position(|j| j.public_ips.contains(ip)) {
                    return Err(JobError::InvalidSpec {
                        index,
                        source: SpecError::Invalid(format!(
                            "public IP {ip} is already attached to item {other}"
                        )),
                    });
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
                public_ips: plan.public_ips,
                unique,
                core_id,
            });
        }
        let firsts: Vec<JobUpdate> = new_jobs.iter().map(|j| j.first_update.clone()).collect();
        let owners: Vec<String> = new_jobs.iter().map(|j| j.owner.clone()).collect();
        let private_pool = deps.config.private_network().map(|p| p.pool());
        let ids = deps
            .store
            .insert_jobs(new_jobs, private_pool)
            .await
            .map_err(|e| match e {
                StoreError::AddressUnknown { .. } => JobError::BadRequest(e.to_string()),
                StoreError::AddressInUse { .. } | StoreError::CoreIdTaken { .. } => {
                    JobError::Conflict(e.to_string())
                }
                StoreError::PoolExhausted { pool } => JobError::Conflict(format!(
                    "no address is left in {pool}; wait for other jobs to end"
                )),
                other => JobError::from(other),
            })?;
        for ((id, update), owner) in ids.iter().zip(firsts).zip(owners) {
            tracing::info!(job_id = %id, %owner, "job accepted");
            let _ = self.inner.changes.send(JobChange {
                job_id: id.clone(),
                update,
            });
            self.inner.ensure_runner(id);
        }
        Ok(ids)
    }

    /// A peer of item `index` must be another RUNNING job of the same owner.
    async fn check_peer(
        &self,
        owner: &Owner,
        index: usize,
        peer: &spec::Peer,
    ) -> Result<(), JobError> {
        let refuse = |why: &str| JobError::InvalidSpec {
            index,
            source: SpecError::Invalid(format!(
                "peer {:?}: job {} {why}",
                peer.hostname, peer.job_id
            )),
        };
        match self.retrieve(owner, &peer.job_id).await {
            Ok(job) if job.state == state::JobState::Running => Ok(()),
            Ok(_) => Err(refuse("is not running")),
            Err(JobError::NotFound { .. }) => Err(refuse("does not exist")),
            Err(other) => Err(other),
        }
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
            self.inner.wake(id);
        }
        Ok(())
    }

    /// Powers running jobs off, keeping their disks. Every item must be the owner's and
    /// RUNNING; otherwise every refused item is reported and nothing changes.
    pub async fn suspend(&self, owner: &Owner, ids: &[String]) -> Result<(), JobError> {
        self.check_each(owner, ids, JobEvent::SuspendRequested)
            .await?;
        self.inner.deps.store.set_suspend_requested(ids).await?;
        for id in ids {
            tracing::info!(job_id = %id, "suspend requested");
            self.inner.wake(id);
        }
        Ok(())
    }

    /// Boots suspended jobs again from their kept disks: they queue, then run.
    pub async fn unsuspend(&self, owner: &Owner, ids: &[String]) -> Result<(), JobError> {
        self.check_each(owner, ids, JobEvent::UnsuspendRequested)
            .await?;
        for id in ids {
            self.inner
                .record(id, Some(state::JobState::InQueue), messages::QUEUED)
                .await?;
            tracing::info!(job_id = %id, "unsuspend requested");
            self.inner.wake(id);
        }
        Ok(())
    }

    /// Checks that `event` may happen to every listed job now; collects every refusal.
    async fn check_each(
        &self,
        owner: &Owner,
        ids: &[String],
        event: JobEvent,
    ) -> Result<(), JobError> {
        let mut errors = Vec::new();
        for id in ids {
            let refused = match self.retrieve(owner, id).await {
                Err(e) => Some(e),
                Ok(job) if job.terminate_requested => Some(JobError::Denied {
                    id: id.clone(),
                    denied: state::Denied::AlreadyFinal,
                }),
                Ok(job) if job.suspend_requested => Some(JobError::Denied {
                    id: id.clone(),
                    denied: state::Denied::NotRunning,
                }),
                Ok(job) => {
                    state::transition(job.state, event)
                        .err()
                        .map(|denied| JobError::Denied {
                            id: id.clone(),
                            denied,
                        })
                }
            };
            errors.extend(refused);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(JobError::Bulk { errors })
        }
    }

    /// Adds time to each job's deadline; all must have one and be active, and no job's
    /// allocation may pass [`spec::MAX_TIME_ALLOCATION_MS`], counting every item of the request.
    pub async fn extend(
        &self,
        owner: &Owner,
        items: &[(String, SimpleDuration)],
    ) -> Result<(), JobError> {
        let mut jobs = Vec::with_capacity(items.len());
        let mut allocations: HashMap<String, i64> = HashMap::new();
        for (id, by) in items {
            let job = self.retrieve(owner, id).await?;
            if job.state.is_final() {
                return Err(JobError::Denied {
                    id: job.id,
                    denied: state::Denied::AlreadyFinal,
                });
            }
            let Some(allocated) = job.allocation_ms else {
                return Err(JobError::NoDeadline { id: job.id });
            };
            let total = allocations.entry(job.id.clone()).or_insert(allocated);
            *total = spec::within_allocation_limit(total.checked_add(by.as_millis()))
                .map_err(|why| JobError::BadRequest(format!("job {}: {why}", job.id)))?;
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
            self.inner.wake(&job.id);
        }
        Ok(())
    }

    /// What this host offers jobs, what running jobs use, and how many wait; `None` while the
    /// hypervisor cannot be reached.
    pub async fn utilization(&self) -> Result<Option<Utilization>, JobError> {
        let Some(host) = self.inner.host_capacity().await else {
            return Ok(None);
        };
        let query = JobQuery {
            active_only: true,
            ..JobQuery::default()
        };
        let mut utilization = Utilization {
            capacity: host.schedulable(),
            ..Utilization::default()
        };
        for job in self.inner.deps.store.jobs(query).await? {
            match job.state {
                state::JobState::Running => {
                    utilization.running += 1;
                    let demand = super::scheduler::demand(self.config(), self.catalog(), &job.spec);
                    utilization.used = utilization.used.plus(demand);
                }
                state::JobState::InQueue => utilization.pending += 1,
                _ => {}
            }
        }
        Ok(Some(utilization))
    }

    /// The schedulable total of this host, for product support flags.
    pub async fn schedulable(&self) -> Option<Resources> {
        self.inner.host_capacity().await.map(|h| h.schedulable())
    }

    /// The domain behind rank `rank` of the owner's job, if the job is RUNNING: where a console
    /// session may attach.
    pub async fn console_domain(
        &self,
        owner: &Owner,
        id: &str,
        rank: u32,
    ) -> Result<String, JobError> {
        let job = self.retrieve(owner, id).await?;
        if job.state != state::JobState::Running || job.suspend_requested || job.terminate_requested
        {
            return Err(JobError::Denied {
                id: id.to_owned(),
                denied: state::Denied::NotRunning,
            });
        }
        if rank >= job.spec.replicas() {
            return Err(JobError::BadRequest(format!(
                "job {id} has {} replica(s); rank {rank} does not exist",
                job.spec.replicas()
            )));
        }
        Ok(self.naming().domain(id, rank))
    }

    /// Console log files of a job's VMs, by rank.
    pub async fn console_logs(&self, id: &str) -> Result<Vec<VmRecord>, JobError> {
        Ok(self.inner.deps.store.vms(id).await?)
    }

    /// Stops every runner and background task at once, as a crash would: nothing is cleaned
    /// up and the VMs are untouched. Lets tests simulate `kill -9` inside one process.
    pub fn halt(&self) {
        let runners =
            std::mem::take(&mut *self.inner.runners.lock().unwrap_or_else(|p| p.into_inner()));
        for runner in runners.values() {
            runner.task.abort();
        }
        for task in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Starts a runner for every active job (used once at startup, after reconciliation).
    pub async fn resume_active_jobs(&self) -> Result<usize, JobError> {
        let ids = self.inner.deps.store.active_job_ids().await?;
        for id in &ids {
            self.inner.ensure_runner(id);
        }
        self.inner.reschedule().await?;
        Ok(ids.len())
    }

    /// Forwards hypervisor events to the runner of the job that owns the domain.
    pub fn spawn_event_router(&self) {
        let mut events = self.inner.deps.backend.subscribe();
        let manager = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if let Some((job_id, _)) =
                            manager.inner.deps.naming.parse_domain(event.name())
                        {
                            manager.inner.send(&job_id, RunnerMsg::Vm(event));
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
        });
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task.abort_handle());
    }
}

fn describe_duration(d: &SimpleDuration) -> String {
    format!("{:02}:{:02}:{:02}", d.hours, d.minutes, d.seconds)
}
