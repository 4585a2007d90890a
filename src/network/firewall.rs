//! vmhost's nftables ruleset, rendered from typed values. Pure.
//!
//! STUB: interface only; the rendering is being written.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Everything the firewall guards, as one desired state. Applying it replaces vmhost's own
/// tables (`ip <table>` and `bridge <table>`) in one atomic transaction; no other table is
/// touched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirewallPlan {
    /// Name of vmhost's tables in both families.
    pub table: String,
    /// vmhost's private network, if it has one.
    pub private: Option<PrivateSegment>,
    /// One entry per VM that exists (running or not); rules of absent taps are inert.
    pub vms: Vec<GuardedVm>,
}

/// The private network's bridge and subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateSegment {
    pub bridge: String,
    /// The subnet, e.g. 10.213.0.0/24.
    pub subnet: Ipv4Net,
    /// The host's address on the bridge (gateway, DHCP and DNS server).
    pub gateway: Ipv4Addr,
}

/// One VM (one rank of a job) and its NICs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedVm {
    pub job_id: String,
    pub rank: u32,
    /// Owner of the job: VMs of different owners must not reach each other privately.
    pub owner: String,
    pub nics: Vec<GuardedNic>,
}

/// One NIC: the only MAC and address its VM may send from on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedNic {
    /// Host-side tap device name.
    pub tap: String,
    /// Lowercase `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    pub address: Ipv4Addr,
    pub role: NicRole,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicRole {
    /// On the private network.
    Private,
    /// A public address: inbound traffic only to these ports (plus replies).
    Public { open_ports: Vec<PortRange> },
}

/// UCloud's `PortRangeAndProto`: `{start, end, protocol}`, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// The `nft -f` script that makes the kernel's vmhost tables equal `plan`.
pub fn render(plan: &FirewallPlan) -> String {
    let _ = plan;
    String::new()
}
