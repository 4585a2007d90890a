//! Scheduling rounds: what the host has, what jobs hold, who may start next.
//!
//! The decision itself is [`capacity::admit`] (pure); this file gathers its inputs from the
//! hypervisor, the filesystem and the store, records why the head of the queue waits, and
//! wakes the runners of admitted jobs. A round runs whenever capacity may have changed: a job
//! was created, unsuspended, stopped or removed, and on every runner's sync tick.

use std::path::Path;
use std::sync::Arc;

use super::capacity::{self, HostCapacity, Resources, Waiting};
use super::manager::Inner;
use super::{spec, JobError, JobSpec, JobState};
use crate::config::Config;
use crate::store::JobQuery;
use crate::telemetry::error_chain;

impl Inner {
    pub(super) fn is_admitted(&self, id: &str) -> bool {
        self.admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// The job's VMs now run (or failed): its state, not the admission, holds its resources.
    pub(super) fn release_admission(&self, id: &str) {
        self.admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The host's capacity with the operator's ratios; `None` while the hypervisor is down.
    pub(super) async fn host_capacity(&self) -> Option<HostCapacity> {
        let config = &self.deps.config;
        let host = match self.deps.backend.host_info().await {
            Ok(host) => host,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot read host capacity");
                return None;
            }
        };
        Some(HostCapacity {
            cpus: u64::from(host.cpus),
            memory_mib: host.memory_mib,
            disk_gib: filesystem_gib(&config.vm_dir()),
            cpu_overcommit: config.cpu_overcommit,
            memory_overcommit: config.memory_overcommit,
            disk_overcommit: config.disk_overcommit,
            reserved_memory_mib: config.reserved_memory_mib,
        })
    }

    /// Admits queued jobs that fit, oldest first, and wakes their runners.
    pub(super) async fn reschedule(self: &Arc<Self>) -> Result<(), JobError> {
        let _round = self.scheduling.lock().await;
        let Some(host) = self.host_capacity().await else {
            return Ok(());
        };
        let query = JobQuery {
            active_only: true,
            oldest_first: true,
            ..JobQuery::default()
        };
        let jobs = self.deps.store.jobs(query).await?;
        let mut held = Resources::default();
        let mut queue = Vec::new();
        for job in &jobs {
            let demand = demand(&self.deps.config, &self.deps.catalog, &job.spec);
            let has_disk = job.started_at.is_some();
            match job.state {
                JobState::Running | JobState::Canceling => held = held.plus(demand),
                JobState::InQueue if self.is_admitted(&job.id) => held = held.plus(demand),
                JobState::InQueue => {
                    if has_disk {
                        held = held.plus(demand.disk_only());
                    }
                    if !job.terminate_requested {
                        queue.push(Waiting {
                            job_id: job.id.clone(),
                            demand,
                            has_disk,
                        });
                    }
                }
                JobState::Suspended => held = held.plus(demand.disk_only()),
                JobState::Success | JobState::Failure | JobState::Expired => {}
            }
        }
        let admission = capacity::admit(host.schedulable(), held, &queue);
        for id in &admission.admitted {
            self.admitted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone());
            self.wake(id);
        }
        if let Some((id, why)) = admission.blocked {
            let job = jobs.iter().find(|j| j.id == id);
            let already_said = job
                .and_then(|j| j.updates.last())
                .and_then(|u| u.status.as_deref());
            if already_said != Some(why.as_str()) {
                tracing::info!(job_id = %id, %why, "job waits for capacity");
                self.record(&id, None, &why).await?;
            }
        }
        Ok(())
    }
}

/// What a job asks of the host when it runs: every replica's vCPUs, memory and disk.
pub(super) fn demand(
    config: &Config,
    catalog: &crate::images::Catalog,
    spec: &JobSpec,
) -> Resources {
    let replicas = u64::from(spec.replicas());
    let Some(product) = config.product(&spec.product.id, &spec.product.category) else {
        return Resources::default();
    };
    let disk_gib = spec::validate(spec, config, catalog)
        .map_or(u64::from(product.disk_gib), |plan| plan.disk_gib);
    Resources {
        vcpus: u64::from(product.cpu) * replicas,
        memory_mib: u64::from(product.memory_in_gigs) * 1024 * replicas,
        disk_gib: disk_gib * replicas,
    }
}

/// Size of the filesystem holding `dir`, in GiB (0 if it cannot be read).
fn filesystem_gib(dir: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(fs) => {
            let bytes = fs.blocks().saturating_mul(fs.fragment_size());
            bytes / (1024 * 1024 * 1024)
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read filesystem size");
            0
        }
    }
}
