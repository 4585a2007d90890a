//! The networks an operator configures: vmhost's private network and the public IP pools.
//!
//! Checked once at startup ([`validate`]); a pool that overlaps another pool or the private
//! network, a gateway outside its subnet or a pool with no usable address stops vmhost with a
//! message naming the pool, because a wrong pool would hand out addresses that are not ours.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::pool::AddressPool;
use crate::backend::PrivateNetworkSpec;

/// vmhost's own NAT network: every VM gets a NIC on it with a fixed address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivateNetworkConfig {
    /// Without it VMs get no private NIC (and no peers).
    pub enabled: bool,
    /// libvirt network name.
    pub name: String,
    /// Host bridge libvirt creates for it (at most 15 bytes).
    pub bridge: String,
    /// The subnet; its first host address is the host's (gateway, DHCP, DNS).
    pub subnet: Ipv4Net,
}

impl Default for PrivateNetworkConfig {
    fn default() -> Self {
        PrivateNetworkConfig {
            enabled: true,
            name: "vmhost".to_owned(),
            bridge: "vmhost0".to_owned(),
            subnet: "10.213.0.0/24".parse().expect("a valid literal subnet"),
        }
    }
}

impl PrivateNetworkConfig {
    /// The host's address on the network.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.hosts().next().unwrap_or(self.subnet.addr())
    }

    /// The addresses VMs get: the subnet without the gateway.
    pub fn pool(&self) -> AddressPool {
        AddressPool::new(self.subnet, &[Ipv4Net::from(self.gateway())])
    }

    /// The libvirt network the hypervisor must run for it.
    pub fn spec(&self) -> PrivateNetworkSpec {
        PrivateNetworkSpec {
            name: self.name.clone(),
            bridge: self.bridge.clone(),
            gateway: self.gateway(),
            prefix_len: self.subnet.prefix_len(),
        }
    }
}

/// A range of public addresses on a host bridge, offered as one product.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicPoolConfig {
    /// Product name and category of the addresses (`networkips` products).
    pub name: String,
    pub subnet: Ipv4Net,
    /// The upstream router: the VM's default route on this NIC.
    pub gateway: Ipv4Addr,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Addresses (or CIDRs) never handed out, e.g. routers and the host's own.
    #[serde(default)]
    pub exclude: Vec<Ipv4Net>,
    /// The host bridge the subnet is reachable on (set up by the operator).
    pub bridge: String,
    #[serde(default)]
    pub description: String,
}

impl PublicPoolConfig {
    /// The addresses VMs get: the subnet without the gateway and the excluded ones.
    pub fn pool(&self) -> AddressPool {
        let mut reserved = self.exclude.clone();
        reserved.push(Ipv4Net::from(self.gateway));
        AddressPool::new(self.subnet, &reserved)
    }
}

/// Why the network configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NetworkConfigError(String);

fn refuse<T>(why: String) -> Result<T, NetworkConfigError> {
    Err(NetworkConfigError(why))
}

/// Interface names the kernel accepts and nft/libvirt XML never misread.
fn valid_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Checks the private network and the pools, alone and against each other.
pub fn validate(
    private: Option<&PrivateNetworkConfig>,
    pools: &[PublicPoolConfig],
) -> Result<(), NetworkConfigError> {
    if let Some(private) = private {
        if private.name.is_empty()
            || !private
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return refuse("private_network.name must be letters, digits, '-' or '_'".into());
        }
        if !valid_interface_name(&private.bridge) {
            return refuse(format!(
                "private_network.bridge {:?} is not a valid interface name (1-15 of [A-Za-z0-9._-])",
                private.bridge
            ));
        }
        if private.subnet != private.subnet.trunc() {
            return refuse(format!(
                "private_network.subnet {} has host bits set; did you mean {}?",
                private.subnet,
                private.subnet.trunc()
            ));
        }
        if !(8..=29).contains(&private.subnet.prefix_len()) {
            return refuse(format!(
                "private_network.subnet {} must be between /8 and /29",
                private.subnet
            ));
        }
        if !private.subnet.addr().is_private() {
            return refuse(format!(
                "private_network.subnet {} is not a private (RFC 1918) range",
                private.subnet
            ));
        }
    }
    let mut names = HashSet::new();
    for (i, pool) in pools.iter().enumerate() {
        let name = &pool.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return refuse(format!(
                "public_pools[{i}].name {name:?} must be letters, digits, '-' or '_'"
            ));
        }
        if !names.insert(name) {
            return refuse(format!("public pool {name:?} is defined twice"));
        }
        if pool.subnet != pool.subnet.trunc() {
            return refuse(format!(
                "public pool {name:?}: subnet {} has host bits set; did you mean {}?",
                pool.subnet,
                pool.subnet.trunc()
            ));
        }
        if !pool.subnet.contains(&pool.gateway)
            || pool.gateway == pool.subnet.network()
            || (pool.subnet.prefix_len() < 31 && pool.gateway == pool.subnet.broadcast())
        {
            return refuse(format!(
                "public pool {name:?}: gateway {} is not a host address of {}",
                pool.gateway, pool.subnet
            ));
        }
        if let Some(outside) = pool.exclude.iter().find(|e| !pool.subnet.contains(*e)) {
            return refuse(format!(
                "public pool {name:?}: excluded {outside} is not inside {}",
                pool.subnet
            ));
        }
        if let Some(bad) = pool
            .dns
            .iter()
            .find(|d| d.is_unspecified() || d.is_broadcast() || d.is_multicast())
        {
            return refuse(format!("public pool {name:?}: {bad} is not a DNS server"));
        }
        if !valid_interface_name(&pool.bridge) {
            return refuse(format!(
                "public pool {name:?}: bridge {:?} is not a valid interface name",
                pool.bridge
            ));
        }
        if pool.pool().capacity() == 0 {
            return refuse(format!(
                "public pool {name:?}: no address of {} is left to hand out",
                pool.subnet
            ));
        }
        if let Some(private) = private {
            if overlaps(pool.subnet, private.subnet) {
                return refuse(format!(
                    "public pool {name:?} ({}) overlaps the private network ({})",
                    pool.subnet, private.subnet
                ));
            }
            if pool.bridge == private.bridge {
                return refuse(format!(
                    "public pool {name:?} uses the private network's bridge {:?}",
                    pool.bridge
                ));
            }
        }
        if let Some(other) = pools[..i].iter().find(|o| overlaps(o.subnet, pool.subnet)) {
            return refuse(format!(
                "public pools {:?} ({}) and {name:?} ({}) overlap",
                other.name, other.subnet, pool.subnet
            ));
        }
    }
    Ok(())
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, subnet: &str, gateway: &str) -> PublicPoolConfig {
        PublicPoolConfig {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            gateway: gateway.parse().unwrap(),
            dns: vec!["203.0.113.53".parse().unwrap()],
            exclude: Vec::new(),
            bridge: "br0".into(),
            description: String::new(),
        }
    }

    fn refused(private: Option<&PrivateNetworkConfig>, pools: &[PublicPoolConfig]) -> String {
        validate(private, pools).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_a_sane_pool_are_accepted() {
        let private = PrivateNetworkConfig::default();
        assert_eq!(private.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        validate(
            Some(&private),
            &[pool("public", "203.0.113.0/24", "203.0.113.1")],
        )
        .unwrap();
    }

    #[test]
    fn overlapping_or_malformed_pools_are_refused_with_their_name() {
        let private = PrivateNetworkConfig::default();
        let a = pool("a", "203.0.113.0/24", "203.0.113.1");
        let b = pool("b", "203.0.113.128/25", "203.0.113.129");
        assert!(refused(None, &[a.clone(), b]).contains("\"a\""));
        let dup = pool("a", "198.51.100.0/24", "198.51.100.1");
        assert!(refused(None, &[a.clone(), dup]).contains("defined twice"));
        let inside_private = pool("p", "10.213.0.0/25", "10.213.0.1");
        assert!(refused(Some(&private), &[inside_private]).contains("overlaps the private"));
        let host_bits = pool("h", "203.0.113.5/24", "203.0.113.1");
        assert!(refused(None, &[host_bits]).contains("host bits"));
        let far_gateway = pool("g", "203.0.113.0/24", "198.51.100.1");
        assert!(refused(None, &[far_gateway]).contains("gateway"));
        let mut excluded_outside = a.clone();
        excluded_outside.exclude = vec!["198.51.100.7/32".parse().unwrap()];
        assert!(refused(None, &[excluded_outside]).contains("not inside"));
        let mut bad_bridge = a.clone();
        bad_bridge.bridge = "br0; drop".into();
        assert!(refused(None, &[bad_bridge]).contains("interface name"));
        let mut full = pool("f", "203.0.113.0/30", "203.0.113.1");
        full.exclude = vec!["203.0.113.2/32".parse().unwrap()];
        assert!(refused(None, &[full]).contains("no address"));
    }

    #[test]
    fn a_public_private_network_is_refused() {
        let private = PrivateNetworkConfig {
            subnet: "203.0.113.0/24".parse().unwrap(),
            ..PrivateNetworkConfig::default()
        };
        assert!(refused(Some(&private), &[]).contains("RFC 1918"));
    }
}
