//! The NICs of one VM, derived from its addresses. Pure.
//!
//! One function decides NIC order, MACs, tap names, addresses and routes, and the domain
//! definition, the cloud-init seed and the firewall all read its answer, so the firewall
//! always guards exactly the MAC and address the guest was given (a static address the
//! filter does not know is the classic anti-spoofing failure, lxc/incus#746).
//!
//! - NIC 0: the private network (when enabled), for every rank.
//! - NIC 1..: rank 0 only, one per attached public IP, on its pool's bridge. The default
//!   route goes through the first public NIC when there is one, else through the private
//!   gateway; the private NIC then keeps only its own subnet.
//! - MACs are `52:54` + the four octets of the NIC's address: unique because addresses are,
//!   and stable across suspend and unsuspend.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use super::firewall::NicRole;
use crate::backend::NicAttachment;
use crate::config::Config;
use crate::store::JobAddresses;

/// One NIC with everything the domain, the seed and the firewall need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNic {
    pub attachment: NicAttachment,
    pub mac: String,
    pub tap: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    /// Whether the guest's default route leaves through this NIC.
    pub default_route: bool,
    pub role: NicRole,
}

/// The host-side tap device of NIC `index`: `vh` + 10 hex digits + `n<index>`, within the
/// kernel's 15-byte limit, distinct per vmhost instance (`agent_id`), and never libvirt's own
/// `vnetN`.
pub fn tap_name(agent_id: &str, job_id: &str, rank: u32, index: u32) -> String {
    let digest = Sha256::digest(format!("{agent_id}/{job_id}/{rank}"));
    format!("vh{}n{index}", hex::encode(&digest[..5]))
}

/// The MAC of the NIC holding `address`. It follows from the address alone, so an address that
/// passes to another VM keeps its MAC: routers' ARP caches stay right without a gratuitous ARP,
/// and a MAC seen on the uplink always maps to one address.
pub fn mac_for(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("52:54:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The NICs of rank `rank` of job `job_id`, on the vmhost instance `agent_id`.
pub fn vm_nics(
    config: &Config,
    agent_id: &str,
    job_id: &str,
    rank: u32,
    addresses: &JobAddresses,
) -> Vec<VmNic> {
    let mut nics = Vec::new();
    let mut index = 0;
    let mut tap = || {
        let name = tap_name(agent_id, job_id, rank, index);
        index += 1;
        name
    };
    let public: Vec<_> = if rank == 0 {
        addresses
            .public
            .iter()
            .filter_map(|ip| config.public_pool(&ip.pool).map(|pool| (ip, pool)))
            .collect()
    } else {
        Vec::new()
    };
    if let (Some(private), Some(address)) = (config.private_network(), addresses.private_of(rank)) {
        nics.push(VmNic {
            attachment: NicAttachment::Network(private.name.clone()),
            mac: mac_for(address),
            tap: tap(),
            address,
            prefix_len: private.subnet.prefix_len(),
            gateway: private.gateway(),
            dns: vec![private.gateway()],
            default_route: public.is_empty(),
            role: NicRole::Private,
        });
    }
    for (position, (ip, pool)) in public.into_iter().enumerate() {
        nics.push(VmNic {
            attachment: NicAttachment::Bridge(pool.bridge.clone()),
            mac: mac_for(ip.address),
            tap: tap(),
            address: ip.address,
            prefix_len: pool.subnet.prefix_len(),
            gateway: pool.gateway,
            dns: pool.dns.clone(),
            default_route: position == 0,
            role: NicRole::Public {
                open_ports: ip.spec.open_ports().to_vec(),
            },
        });
    }
    nics
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::config::PublicPoolConfig;
    use crate::network::firewall::{PortRange, Protocol};
    use crate::network::ip::{FirewallSpec, PublicIpRecord, PublicIpSpec};

    fn config() -> Config {
        Config {
            public_pools: vec![PublicPoolConfig {
                name: "public".into(),
                subnet: "203.0.113.0/24".parse().unwrap(),
                gateway: "203.0.113.1".parse().unwrap(),
                dns: vec!["203.0.113.53".parse().unwrap()],
                exclude: Vec::new(),
                bridge: "br-pub".into(),
                description: String::new(),
            }],
            ..Config::default()
        }
    }

    fn addresses() -> JobAddresses {
        let ssh = PortRange {
            start: 22,
            end: 22,
            protocol: Protocol::Tcp,
        };
        JobAddresses {
            private: vec![
                (0, "10.213.0.2".parse().unwrap()),
                (1, "10.213.0.3".parse().unwrap()),
            ],
            public: vec![PublicIpRecord {
                id: "1".into(),
                owner: "u".into(),
                pool: "public".into(),
                address: "203.0.113.10".parse().unwrap(),
                spec: PublicIpSpec {
                    product: crate::ucloud::ProductRef {
                        id: "public".into(),
                        category: "public".into(),
                        provider: "vmhost".into(),
                    },
                    labels: None,
                    firewall: Some(FirewallSpec {
                        open_ports: vec![ssh],
                    }),
                },
                bound_job: Some("7".into()),
                created_at: 0,
            }],
        }
    }

    #[test]
    fn taps_fit_the_kernel_limit_and_are_distinct() {
        let tap = tap_name("a", "123456789", 7, 9);
        assert!(tap.len() <= 15 && tap.starts_with("vh"), "{tap}");
        assert_eq!(tap, tap_name("a", "123456789", 7, 9));
        assert_ne!(tap_name("a", "1", 0, 0), tap_name("a", "1", 1, 0));
        assert_ne!(tap_name("a", "1", 0, 0), tap_name("a", "1", 0, 1));
        assert_ne!(tap_name("a", "1", 0, 0), tap_name("b", "1", 0, 0));
    }

    #[test]
    fn rank_zero_gets_the_public_nic_and_the_default_route_through_it() {
        let nics = vm_nics(&config(), "a", "7", 0, &addresses());
        assert_eq!(nics.len(), 2);
        assert_eq!(nics[0].attachment, NicAttachment::Network("vmhost".into()));
        assert_eq!(nics[0].mac, "52:54:0a:d5:00:02");
        assert!(!nics[0].default_route);
        assert_eq!(nics[1].attachment, NicAttachment::Bridge("br-pub".into()));
        assert_eq!(nics[1].mac, "52:54:cb:00:71:0a");
        assert_eq!(nics[1].gateway, Ipv4Addr::new(203, 0, 113, 1));
        assert!(nics[1].default_route);
        assert_ne!(nics[0].tap, nics[1].tap);
    }

    #[test]
    fn other_ranks_get_only_their_private_nic_with_the_default_route() {
        let nics = vm_nics(&config(), "a", "7", 1, &addresses());
        assert_eq!(nics.len(), 1);
        assert_eq!(nics[0].address, Ipv4Addr::new(10, 213, 0, 3));
        assert!(nics[0].default_route);
        assert_eq!(nics[0].role, NicRole::Private);
    }

    #[test]
    fn without_the_private_network_only_public_nics_remain() {
        let mut config = config();
        config.private_network.enabled = false;
        let nics = vm_nics(&config, "a", "7", 0, &addresses());
        assert_eq!(nics.len(), 1);
        assert!(nics[0].default_route);
    }
}
