//! Which address of a subnet to hand out next. Pure.
//!
//! The store holds what is taken (with a UNIQUE constraint, so two allocations can never
//! share an address even if this logic were wrong); this module only chooses among the rest:
//! the lowest usable address not taken, which keeps allocation predictable for operators.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A subnet's usable host addresses minus reserved ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPool {
    subnet: Ipv4Net,
    reserved: Vec<Ipv4Net>,
}

impl AddressPool {
    pub fn new(subnet: Ipv4Net, reserved: &[Ipv4Net]) -> AddressPool {
        AddressPool {
            subnet: subnet.trunc(),
            reserved: reserved.to_vec(),
        }
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// Whether `address` may be handed out: a host address of the subnet (not its network or
    /// broadcast address) that is not reserved.
    pub fn is_usable(&self, address: Ipv4Addr) -> bool {
        let host = if self.subnet.prefix_len() >= 31 {
            self.subnet.contains(&address)
        } else {
            self.subnet.contains(&address)
                && address != self.subnet.network()
                && address != self.subnet.broadcast()
        };
        host && !self.reserved.iter().any(|r| r.contains(&address))
    }

    /// How many addresses the pool can hand out in total.
    pub fn capacity(&self) -> u64 {
        self.subnet
            .hosts()
            .filter(|a| self.is_usable(*a))
            .map(|_| 1u64)
            .sum()
    }

    /// The lowest usable address not in `taken`; `None` when the pool is exhausted.
    pub fn first_free(&self, taken: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        self.subnet
            .hosts()
            .find(|a| self.is_usable(*a) && !taken.contains(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn network_broadcast_and_reserved_addresses_are_never_handed_out() {
        let pool = AddressPool::new(net("203.0.113.0/29"), &[net("203.0.113.1/32")]);
        assert_eq!(pool.capacity(), 5);
        let mut taken = HashSet::new();
        let mut got = Vec::new();
        while let Some(a) = pool.first_free(&taken) {
            taken.insert(a);
            got.push(a.octets()[3]);
        }
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
    }

    #[test]
    fn point_to_point_and_single_host_subnets_use_every_address() {
        assert_eq!(AddressPool::new(net("198.51.100.0/31"), &[]).capacity(), 2);
        assert_eq!(AddressPool::new(net("198.51.100.9/32"), &[]).capacity(), 1);
    }

    proptest! {
        /// Allocating until exhaustion never repeats an address, never leaves the subnet,
        /// never hits a reserved address, and hands out exactly `capacity` addresses; a
        /// released address is handed out again.
        #[test]
        fn allocation_is_unique_inside_and_round_trips(
            prefix in 24u8..=32,
            reserved_hosts in proptest::collection::vec(0u8..=255, 0..8),
            release_pick in any::<prop::sample::Index>(),
        ) {
            let subnet = Ipv4Net::new(Ipv4Addr::new(203, 0, 113, 0), prefix).unwrap().trunc();
            let reserved: Vec<Ipv4Net> = reserved_hosts
                .iter()
                .map(|h| Ipv4Net::from(Ipv4Addr::new(203, 0, 113, *h)))
                .collect();
            let pool = AddressPool::new(subnet, &reserved);
            let mut taken = HashSet::new();
            let mut order = Vec::new();
            while let Some(a) = pool.first_free(&taken) {
                prop_assert!(subnet.contains(&a));
                prop_assert!(!reserved.iter().any(|r| r.contains(&a)));
                prop_assert!(taken.insert(a), "{} handed out twice", a);
                order.push(a);
            }
            prop_assert_eq!(u64::try_from(order.len()).unwrap(), pool.capacity());
            if !order.is_empty() {
                let released = order[release_pick.index(order.len())];
                taken.remove(&released);
                prop_assert_eq!(pool.first_free(&taken), Some(released));
            }
        }
    }
}
