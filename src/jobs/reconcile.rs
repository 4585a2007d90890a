//! Startup reconciliation of the store against the hypervisor.
//!
//! Runs once before the API opens. Domains carrying this vmhost's agent id whose job is final
//! (or whose records say they were being removed) are removed with their files; domains of
//! anyone else are reported and never touched. Active jobs are then handed to their runners,
//! which re-adopt running domains, mark vanished ones FAILURE and finish interrupted
//! provisioning or teardown.

use std::collections::HashSet;

use super::{JobError, JobManager};
use crate::telemetry::error_chain;

/// What reconciliation found, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Domains of final jobs, or leftovers, that were removed.
    pub removed: Vec<String>,
    /// Domains with this vmhost's prefix that it does not own (left alone).
    pub foreign: Vec<String>,
    /// Active jobs handed back to their runners.
    pub resumed: usize,
}

impl JobManager {
    pub async fn reconcile(&self) -> Result<ReconcileReport, JobError> {
        let store = self.store();
        let naming = self.naming();
        let mut report = ReconcileReport::default();
        let domains = match self.backend().list(&naming.prefix).await {
            Ok(domains) => domains,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot list domains; runners will sync later");
                Vec::new()
            }
        };
        let mut seen = HashSet::new();
        for domain in domains {
            let ours = domain
                .owner
                .as_ref()
                .filter(|o| o.agent_id == naming.agent_id);
            let Some(owner) = ours else {
                tracing::warn!(domain = %domain.name, "domain is not managed by this vmhost; leaving it alone");
                report.foreign.push(domain.name);
                continue;
            };
            seen.insert(domain.name.clone());
            match store.job(&owner.job_id).await? {
                Some(job) if !job.state.is_final() => {}
                Some(_) => {
                    let record = naming.record(&owner.job_id, owner.rank);
                    self.remove_leftover(&record).await?;
                    report.removed.push(domain.name);
                }
                None => {
                    tracing::warn!(domain = %domain.name, job_id = %owner.job_id,
                        "domain stamped by this vmhost belongs to no known job; leaving it alone");
                    report.foreign.push(domain.name);
                }
            }
        }
        // Records of final jobs whose domain is already gone: only files may remain.
        for vm in store.all_vms().await? {
            let is_final = store
                .job(&vm.job_id)
                .await?
                .is_none_or(|j| j.state.is_final());
            if is_final && !report.removed.contains(&vm.domain) {
                self.remove_leftover(&vm).await?;
                if !seen.contains(&vm.domain) {
                    report.removed.push(vm.domain);
                }
            }
        }
        report.resumed = self.resume_active_jobs().await?;
        tracing::info!(
            removed = report.removed.len(),
            foreign = report.foreign.len(),
            resumed = report.resumed,
            "reconciled store with hypervisor"
        );
        Ok(report)
    }
}
