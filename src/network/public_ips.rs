//! Public IP resources (UCloud's `networkips`): allocation from the configured pools, owner
//! scoping, firewall changes, and deletion.
//!
//! An address is chosen and recorded in one store transaction whose UNIQUE constraint makes a
//! double allocation impossible. Binding to jobs happens when a job is created (see
//! [`crate::jobs`]); the binding is released in the same transaction that makes the job
//! final. A firewall change of a bound address re-applies the host firewall at once.

use std::sync::Arc;

use super::guard::{FirewallGuard, GuardError};
use super::ip::{FirewallSpec, PublicIpRecord, PublicIpSpec};
use crate::config::Config;
use crate::store::{Store, StoreError};
use crate::ucloud::{now_millis, Owner};

/// Most port ranges one address may open; each becomes firewall rules.
pub const MAX_OPEN_PORT_RANGES: usize = 64;

/// Why a public IP request is refused.
#[derive(Debug, thiserror::Error)]
pub enum PublicIpError {
    #[error("{0}")]
    Invalid(String),
    #[error("public IP {id} does not exist")]
    NotFound { id: String },
    #[error("no more IP addresses are available in pool {pool}")]
    Exhausted { pool: String },
    #[error("public IP {id} is currently in use by job {job}")]
    InUse { id: String, job: String },
    #[error(transparent)]
    Store(StoreError),
    #[error("the firewall could not be updated")]
    Firewall(#[from] GuardError),
}

impl From<StoreError> for PublicIpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::PoolExhausted { pool } => PublicIpError::Exhausted { pool },
            StoreError::AddressUnknown { id } => PublicIpError::NotFound { id },
            StoreError::AddressInUse { id, job } => PublicIpError::InUse { id, job },
            other => PublicIpError::Store(other),
        }
    }
}

/// Checks a firewall: ranges ordered, within 0-65535, not too many.
pub fn validate_firewall(firewall: &FirewallSpec) -> Result<(), PublicIpError> {
    if firewall.open_ports.len() > MAX_OPEN_PORT_RANGES {
        return Err(PublicIpError::Invalid(format!(
            "at most {MAX_OPEN_PORT_RANGES} port ranges may be open per address"
        )));
    }
    if let Some(bad) = firewall.open_ports.iter().find(|r| r.start > r.end) {
        return Err(PublicIpError::Invalid(format!(
            "port range {}-{} ends before it starts",
            bad.start, bad.end
        )));
    }
    Ok(())
}

/// The public IP service behind `/api/networkips`.
#[derive(Clone, Debug)]
pub struct PublicIps {
    config: Arc<Config>,
    store: Store,
    guard: Arc<FirewallGuard>,
}

impl PublicIps {
    pub fn new(config: Arc<Config>, store: Store, guard: Arc<FirewallGuard>) -> PublicIps {
        PublicIps {
            config,
            store,
            guard,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Allocates one address per item, all or none.
    pub async fn create(
        &self,
        owner: &Owner,
        specs: Vec<PublicIpSpec>,
    ) -> Result<Vec<PublicIpRecord>, PublicIpError> {
        if specs.is_empty() {
            return Err(PublicIpError::Invalid(
                "items must hold at least one public IP".into(),
            ));
        }
        let mut pools = Vec::with_capacity(specs.len());
        for spec in &specs {
            let product = &spec.product;
            let pool = self
                .config
                .public_pool(&product.id)
                .filter(|p| {
                    p.name == product.category && product.provider == self.config.provider_id
                })
                .ok_or_else(|| {
                    PublicIpError::Invalid(format!(
                        "unknown public IP product {:?} in category {:?} of provider {:?}",
                        product.id, product.category, product.provider
                    ))
                })?;
            if let Some(firewall) = &spec.firewall {
                validate_firewall(firewall)?;
            }
            pools.push(pool.clone());
        }
        let now = now_millis();
        let created = self
            .store
            .insert_public_ips(owner.0.clone(), specs.into_iter().zip(pools).collect(), now)
            .await?;
        for ip in &created {
            tracing::info!(id = %ip.id, owner = %owner.0, address = %ip.address, "public IP allocated");
        }
        Ok(created)
    }

    /// The owner's address (another user's is "not found").
    pub async fn retrieve(&self, owner: &Owner, id: &str) -> Result<PublicIpRecord, PublicIpError> {
        match self.store.public_ip(id).await? {
            Some(ip) if ip.owner == owner.0 => Ok(ip),
            _ => Err(PublicIpError::NotFound { id: id.to_owned() }),
        }
    }

    /// The owner's addresses, newest first, older than `before_id`.
    pub async fn browse(
        &self,
        owner: &Owner,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<PublicIpRecord>, PublicIpError> {
        Ok(self
            .store
            .public_ips(owner.0.clone(), before_id, limit)
            .await?)
    }

    /// Releases the addresses; refused (all of them) if any is attached to an active job.
    pub async fn delete(&self, owner: &Owner, ids: Vec<String>) -> Result<(), PublicIpError> {
        self.store
            .delete_public_ips(owner.0.clone(), ids.clone())
            .await?;
        tracing::info!(?ids, owner = %owner.0, "public IPs released");
        Ok(())
    }

    /// Replaces the open ports of each address, all or none; applies to running VMs at once.
    pub async fn update_firewall(
        &self,
        owner: &Owner,
        items: Vec<(String, FirewallSpec)>,
    ) -> Result<(), PublicIpError> {
        for (_, firewall) in &items {
            validate_firewall(firewall)?;
        }
        let bound = self
            .store
            .set_public_ip_firewalls(owner.0.clone(), items)
            .await?;
        if bound {
            self.guard.sync().await?;
        }
        Ok(())
    }
}
