//! `network-config` (version 2): one `ethernets` entry per NIC, matched by MAC and renamed to
//! `ethN` in spec order, with DHCP or a static address. Pure.
//!
//! The default route is written `to: 0.0.0.0/0`, not netplan's `to: default`: cloud-init before
//! 23.x (Debian 12 ships 22.4.2) converts v2 routes itself for non-netplan renderers (ifupdown,
//! sysconfig, networkd) and fails on `default` ("Address default is not a valid ip address",
//! `cloudinit/net/network_state.py::_normalize_net_keys`). Both spellings mean the same route.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde_json::{json, Map, Value};

use super::{validate, yaml, NicAddressing, SeedError, SeedNic};

/// Renders `network-config`; with no NICs, an empty but valid v2 document.
pub(crate) fn render(nics: &[SeedNic]) -> Result<String, SeedError> {
    let mut seen = HashSet::new();
    let mut ethernets = Map::new();
    for (index, nic) in nics.iter().enumerate() {
        let octets = validate::mac(&nic.mac)?;
        if !seen.insert(octets) {
            return Err(SeedError::Invalid(format!(
                "MAC address {} is used by more than one NIC",
                nic.mac
            )));
        }
        let mut entry = json!({
            "match": {"macaddress": nic.mac},
            "set-name": format!("eth{index}"),
        });
        match &nic.addressing {
            NicAddressing::Dhcp => entry["dhcp4"] = Value::Bool(true),
            NicAddressing::Static {
                address,
                prefix_len,
                gateway,
                dns,
            } => {
                check_static(&nic.mac, *address, *prefix_len, *gateway, dns)?;
                entry["addresses"] = json!([format!("{address}/{prefix_len}")]);
                if let Some(gateway) = gateway {
                    entry["routes"] = json!([{"to": "0.0.0.0/0", "via": gateway.to_string()}]);
                }
                if !dns.is_empty() {
                    let dns: Vec<String> = dns.iter().map(Ipv4Addr::to_string).collect();
                    entry["nameservers"] = json!({ "addresses": dns });
                }
            }
        }
        ethernets.insert(format!("nic{index}"), entry);
    }
    yaml::to_string(&json!({"version": 2, "ethernets": ethernets}))
}

/// Refuses static settings a guest could not use: a prefix outside 1..=32, an address that is
/// not a usable host address, a gateway that is not another host on the same subnet (it would
/// need an on-link route), or an unusable DNS server.
fn check_static(
    mac: &str,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
    dns: &[Ipv4Addr],
) -> Result<(), SeedError> {
    let bad = |why: String| SeedError::Invalid(format!("NIC {mac}: {why}"));
    if !(1..=32).contains(&prefix_len) {
        return Err(bad(format!(
            "prefix length /{prefix_len} is not between /1 and /32"
        )));
    }
    let mask = u32::MAX << (32 - u32::from(prefix_len));
    let network = u32::from(address) & mask;
    let broadcast = network | !mask;
    let is_host = |ip: Ipv4Addr| {
        let n = u32::from(ip);
        !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast())
            && (prefix_len >= 31 || (n != network && n != broadcast))
    };
    if !is_host(address) {
        return Err(bad(format!(
            "{address}/{prefix_len} is not a usable host address"
        )));
    }
    if let Some(gateway) = gateway {
        if gateway == address || !is_host(gateway) || u32::from(gateway) & mask != network {
            return Err(bad(format!(
                "gateway {gateway} is not another host address inside {address}/{prefix_len}"
            )));
        }
    }
    if let Some(server) = dns
        .iter()
        .find(|s| s.is_unspecified() || s.is_multicast() || s.is_broadcast())
    {
        return Err(bad(format!("{server} is not a usable DNS server")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(mac: &str, addressing: NicAddressing) -> SeedNic {
        SeedNic {
            mac: mac.to_owned(),
            addressing,
        }
    }

    fn fixed(
        address: [u8; 4],
        prefix_len: u8,
        gateway: Option<[u8; 4]>,
        dns: &[[u8; 4]],
    ) -> NicAddressing {
        NicAddressing::Static {
            address: address.into(),
            prefix_len,
            gateway: gateway.map(Ipv4Addr::from),
            dns: dns.iter().copied().map(Ipv4Addr::from).collect(),
        }
    }

    fn parsed(nics: &[SeedNic]) -> Value {
        serde_yaml::from_str(&render(nics).unwrap()).unwrap()
    }

    #[test]
    fn no_nics_is_an_empty_v2_document() {
        assert_eq!(parsed(&[]), json!({"version": 2, "ethernets": {}}));
    }

    #[test]
    fn dhcp_and_static_entries() {
        let nics = [
            nic("52:54:00:aa:bb:01", NicAddressing::Dhcp),
            nic(
                "52:54:00:aa:bb:02",
                fixed(
                    [203, 0, 113, 10],
                    24,
                    Some([203, 0, 113, 1]),
                    &[[1, 1, 1, 1], [9, 9, 9, 9]],
                ),
            ),
            nic("52:54:00:aa:bb:03", fixed([198, 51, 100, 7], 32, None, &[])),
        ];
        assert_eq!(
            parsed(&nics),
            json!({"version": 2, "ethernets": {
                "nic0": {"match": {"macaddress": "52:54:00:aa:bb:01"}, "set-name": "eth0", "dhcp4": true},
                "nic1": {
                    "match": {"macaddress": "52:54:00:aa:bb:02"}, "set-name": "eth1",
                    "addresses": ["203.0.113.10/24"],
                    "routes": [{"to": "0.0.0.0/0", "via": "203.0.113.1"}],
                    "nameservers": {"addresses": ["1.1.1.1", "9.9.9.9"]},
                },
                "nic2": {"match": {"macaddress": "52:54:00:aa:bb:03"}, "set-name": "eth2", "addresses": ["198.51.100.7/32"]},
            }})
        );
    }

    #[track_caller]
    fn assert_invalid(nics: &[SeedNic], needle: &str) {
        match render(nics) {
            Err(SeedError::Invalid(msg)) => {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
            }
            other => panic!("expected Invalid containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn refuses_bad_nics() {
        let mac = "52:54:00:aa:bb:01";
        assert_invalid(
            &[nic("52:54:00:AA:BB:01", NicAddressing::Dhcp)],
            "lowercase hex",
        );
        assert_invalid(
            &[nic(mac, NicAddressing::Dhcp), nic(mac, NicAddressing::Dhcp)],
            "more than one NIC",
        );
        assert_invalid(
            &[nic(mac, fixed([203, 0, 113, 10], 0, None, &[]))],
            "prefix length /0",
        );
        assert_invalid(
            &[nic(mac, fixed([203, 0, 113, 10], 33, None, &[]))],
            "prefix length /33",
        );
        assert_invalid(
            &[nic(mac, fixed([203, 0, 113, 0], 24, None, &[]))],
            "not a usable host",
        );
        assert_invalid(
            &[nic(mac, fixed([203, 0, 113, 255], 24, None, &[]))],
            "not a usable host",
        );
        assert_invalid(
            &[nic(mac, fixed([0, 0, 0, 0], 8, None, &[]))],
            "not a usable host",
        );
        assert_invalid(
            &[nic(mac, fixed([224, 0, 0, 5], 8, None, &[]))],
            "not a usable host",
        );
        assert_invalid(
            &[nic(
                mac,
                fixed([203, 0, 113, 10], 24, Some([198, 51, 100, 1]), &[]),
            )],
            "gateway",
        );
        assert_invalid(
            &[nic(
                mac,
                fixed([203, 0, 113, 10], 24, Some([203, 0, 113, 10]), &[]),
            )],
            "gateway",
        );
        assert_invalid(
            &[nic(
                mac,
                fixed([203, 0, 113, 10], 24, Some([203, 0, 113, 255]), &[]),
            )],
            "gateway",
        );
        assert_invalid(
            &[nic(
                mac,
                fixed([203, 0, 113, 10], 32, Some([203, 0, 113, 1]), &[]),
            )],
            "gateway",
        );
        assert_invalid(
            &[nic(
                mac,
                fixed([203, 0, 113, 10], 24, None, &[[0, 0, 0, 0]]),
            )],
            "DNS",
        );
    }

    #[test]
    fn point_to_point_prefixes_use_every_address() {
        render(&[nic(
            "52:54:00:aa:bb:01",
            fixed([203, 0, 113, 0], 31, Some([203, 0, 113, 1]), &[]),
        )])
        .unwrap();
    }
}
