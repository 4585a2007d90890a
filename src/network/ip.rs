//! A public IP as stored and shown: its specification (product, labels, firewall) and its
//! allocation.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::firewall::PortRange;
use crate::ucloud::ProductRef;

/// UCloud's `PublicIPSpecification`: stored as given, echoed back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublicIpSpec {
    pub product: ProductRef,
    #[serde(default)]
    pub labels: Option<Map<String, Value>>,
    #[serde(default)]
    pub firewall: Option<FirewallSpec>,
}

/// UCloud's `FirewallAndId.firewall`: the ports open to the world.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FirewallSpec {
    #[serde(default)]
    pub open_ports: Vec<PortRange>,
}

impl PublicIpSpec {
    pub fn open_ports(&self) -> &[PortRange] {
        self.firewall.as_ref().map_or(&[], |f| &f.open_ports)
    }
}

/// A public IP as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicIpRecord {
    pub id: String,
    pub owner: String,
    /// Name of the pool (and product) the address comes from.
    pub pool: String,
    pub address: Ipv4Addr,
    pub spec: PublicIpSpec,
    /// The active job the address is attached to.
    pub bound_job: Option<String>,
    pub created_at: i64,
}
