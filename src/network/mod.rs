//! Host networking for VMs: the private network vmhost owns, the public IP pools, and the
//! firewall that guards every VM NIC.
//!
//! - [`config`]: the networks an operator configures, checked once at startup.
//! - [`pool`]: which address of a pool to hand out next (pure).
//! - [`firewall`]: the nftables ruleset for a set of guarded VMs (pure rendering).
//! - [`nft`]: the [`nft::Firewall`] seam that installs a ruleset (real `nft`, or a fake).
//! - [`layout`]: a VM's NICs from its addresses, shared by domain, seed and firewall (pure).
//! - [`guard`]: keeps the host firewall equal to the store.
//! - [`ip`]: a public IP as stored; [`public_ips`]: the service behind `/api/networkips`.

pub mod config;
pub mod firewall;
pub mod guard;
pub mod ip;
pub mod layout;
pub mod nft;
pub mod pool;
pub mod public_ips;
