//! [`FirewallGuard`]: keeps the host firewall equal to what the store says exists.
//!
//! Every change that affects rules (a VM record written before its domain starts, a VM
//! removed, a firewall edited, vmhost starting) calls [`FirewallGuard::sync`], which reads
//! every VM with its addresses, renders the whole plan and applies it atomically. Applying
//! the whole state keeps the firewall correct after any crash or missed call: the next sync
//! repairs it. Syncs are serialised so an older plan never lands after a newer one. With no VM
//! to guard, vmhost's tables are removed altogether.

use std::sync::Arc;

use super::firewall::{FirewallPlan, GuardedNic, GuardedVm, PrivateSegment};
use super::layout::vm_nics;
use super::nft::{Firewall, FirewallError};
use crate::config::Config;
use crate::store::{AddressedVm, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot read the VMs' addresses")]
    Store(#[from] StoreError),
    #[error("cannot install the firewall rules")]
    Firewall(#[from] FirewallError),
}

#[derive(Debug)]
pub struct FirewallGuard {
    config: Arc<Config>,
    /// This vmhost's identity, part of every tap name.
    agent_id: String,
    store: Store,
    firewall: Arc<dyn Firewall>,
    serial: tokio::sync::Mutex<()>,
}

impl FirewallGuard {
    pub fn new(
        config: Arc<Config>,
        agent_id: String,
        store: Store,
        firewall: Arc<dyn Firewall>,
    ) -> FirewallGuard {
        FirewallGuard {
            config,
            agent_id,
            store,
            firewall,
            serial: tokio::sync::Mutex::new(()),
        }
    }

    /// Makes the host's rules match the store.
    pub async fn sync(&self) -> Result<(), GuardError> {
        let _one_at_a_time = self.serial.lock().await;
        let vms = self.store.addressed_vms().await?;
        let plan = plan(&self.config, &self.agent_id, &vms);
        if plan.vms.is_empty() {
            // Nothing to guard: no tables at all, rather than empty ones left on the host.
            self.firewall.remove(&plan.table).await?;
        } else {
            self.firewall.apply(&plan).await?;
        }
        tracing::debug!(vms = plan.vms.len(), "firewall synced");
        Ok(())
    }
}

/// The name of this vmhost's nftables tables: its domain prefix, in nft's identifier alphabet.
pub fn table_name(config: &Config) -> String {
    config
        .domain_prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The firewall plan for `vms`. Pure.
pub fn plan(config: &Config, agent_id: &str, vms: &[AddressedVm]) -> FirewallPlan {
    let private = config.private_network().map(|p| PrivateSegment {
        bridge: p.bridge.clone(),
        subnet: p.subnet,
        gateway: p.gateway(),
    });
    let vms = vms
        .iter()
        .map(|vm| GuardedVm {
            job_id: vm.job_id.clone(),
            rank: vm.rank,
            owner: vm.owner.clone(),
            nics: vm_nics(config, agent_id, &vm.job_id, vm.rank, &vm.addresses)
                .into_iter()
                .map(|nic| GuardedNic {
                    tap: nic.tap,
                    mac: nic.mac,
                    address: nic.address,
                    role: nic.role,
                })
                .collect(),
        })
        .filter(|vm| !vm.nics.is_empty())
        .collect();
    FirewallPlan {
        table: table_name(config),
        private,
        vms,
    }
}
