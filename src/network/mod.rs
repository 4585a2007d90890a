//! Host networking for VMs: the private network vmhost owns, the public IP pools, and the
//! firewall that guards every VM NIC.
//!
//! - [`config`]: the networks an operator configures, checked once at startup.
//! - [`pool`]: which address of a pool to hand out next (pure).
//! - [`firewall`]: the nftables ruleset for a set of guarded VMs (pure rendering).
//! - [`nft`]: the [`nft::Firewall`] seam that installs a ruleset (real `nft`, or a fake).

pub mod firewall;
pub mod nft;
