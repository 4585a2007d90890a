//! The [`Firewall`] seam: installs a [`FirewallPlan`] on the host.
//!
//! STUB: interface only; the nft implementation is being written.

use std::sync::Mutex;

use async_trait::async_trait;

use super::firewall::FirewallPlan;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("nft refused the ruleset: {stderr}")]
    Rejected { stderr: String },
    #[error("cannot run nft")]
    Spawn(#[source] std::io::Error),
    #[error("the host cannot filter bridged traffic: {0}")]
    HostUnsuitable(String),
}

/// Installs vmhost's firewall. Every call carries the whole desired state, so a call that
/// failed is repaired by the next one.
#[async_trait]
pub trait Firewall: Send + Sync + std::fmt::Debug + 'static {
    /// Replaces vmhost's tables with `plan`, atomically.
    async fn apply(&self, plan: &FirewallPlan) -> Result<(), FirewallError>;
    /// Deletes vmhost's tables named `table`; `Ok` if they do not exist.
    async fn remove(&self, table: &str) -> Result<(), FirewallError>;
}

/// Installs plans with the `nft` command (STUB until the implementation lands).
#[derive(Debug, Default)]
pub struct NftFirewall;

#[async_trait]
impl Firewall for NftFirewall {
    async fn apply(&self, _plan: &FirewallPlan) -> Result<(), FirewallError> {
        Ok(())
    }

    async fn remove(&self, _table: &str) -> Result<(), FirewallError> {
        Ok(())
    }
}

/// Records plans instead of installing them (component tests, `backend = "fake"`).
#[derive(Debug, Default)]
pub struct FakeFirewall {
    applied: Mutex<Vec<FirewallPlan>>,
}

impl FakeFirewall {
    /// The last plan applied, if any.
    pub fn current(&self) -> Option<FirewallPlan> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    }
}

#[async_trait]
impl Firewall for FakeFirewall {
    async fn apply(&self, plan: &FirewallPlan) -> Result<(), FirewallError> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(plan.clone());
        Ok(())
    }

    async fn remove(&self, _table: &str) -> Result<(), FirewallError> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(FirewallPlan::default());
        Ok(())
    }
}
