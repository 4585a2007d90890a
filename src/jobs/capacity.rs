//! Host capacity and the admission queue: pure decisions, no I/O.
//!
//! A running job holds its vCPUs, memory and disk; a suspended job holds only its disk (the
//! overlay stays). Jobs waiting in `IN_QUEUE` are admitted strictly in FIFO order: the first one
//! that does not fit blocks the ones behind it, so a large job is never starved by small ones.
//! Capacity is the host's, multiplied by the configured overcommit ratios.

use std::fmt;

/// An amount of host resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Resources {
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus + other.vcpus,
            memory_mib: self.memory_mib + other.memory_mib,
            disk_gib: self.disk_gib + other.disk_gib,
        }
    }

    /// `self` minus `other`, floored at zero.
    pub fn minus(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
        }
    }

    pub fn fits_in(self, room: Resources) -> bool {
        self.vcpus <= room.vcpus
            && self.memory_mib <= room.memory_mib
            && self.disk_gib <= room.disk_gib
    }

    /// Only the disk part: what a suspended job keeps holding.
    pub fn disk_only(self) -> Resources {
        Resources {
            vcpus: 0,
            memory_mib: 0,
            disk_gib: self.disk_gib,
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vCPU, {} MiB memory, {} GiB disk",
            self.vcpus, self.memory_mib, self.disk_gib
        )
    }
}

/// The host as the hypervisor and the filesystem report it, with the operator's ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCapacity {
    pub cpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub disk_overcommit: f64,
    /// Memory kept for the host itself, before overcommit.
    pub reserved_memory_mib: u64,
}

impl HostCapacity {
    /// What jobs may hold in total.
    pub fn schedulable(&self) -> Resources {
        let scale = |amount: u64, ratio: f64| {
            // Ratios are validated positive and amounts are far below 2^52, so the float
            // round trip is exact enough and cannot overflow.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let scaled = (amount as f64 * ratio).floor() as u64;
            scaled
        };
        Resources {
            vcpus: scale(self.cpus, self.cpu_overcommit),
            memory_mib: scale(
                self.memory_mib.saturating_sub(self.reserved_memory_mib),
                self.memory_overcommit,
            ),
            disk_gib: scale(self.disk_gib, self.disk_overcommit),
        }
    }
}

/// A job waiting for admission, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub job_id: String,
    pub demand: Resources,
    /// A resumed job already has its disk; only compute is asked for.
    pub has_disk: bool,
}

/// The outcome of one admission round.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Admission {
    pub admitted: Vec<String>,
    /// The head of the queue that did not fit, and why, for its status message.
    pub blocked: Option<(String, String)>,
}

/// Admits waiting jobs in order while they fit next to what is `held`.
pub fn admit(total: Resources, held: Resources, queue: &[Waiting]) -> Admission {
    let mut free = total.minus(held);
    let mut admission = Admission::default();
    for job in queue {
        let need = if job.has_disk {
            Resources {
                disk_gib: 0,
                ..job.demand
            }
        } else {
            job.demand
        };
        if !need.fits_in(free) {
            let why = if job.demand.fits_in(total) {
                // Stable wording (no free amounts), so a waiting job gets one update, not one per round.
                format!("Waiting in the queue for free capacity on this host: the job needs {need}")
            } else {
                format!("The job needs {need}, more than this host has in total ({total})")
            };
            admission.blocked = Some((job.job_id.clone(), why));
            break;
        }
        free = free.minus(need);
        admission.admitted.push(job.job_id.clone());
    }
    admission
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(vcpus: u64, memory_mib: u64, disk_gib: u64) -> Resources {
        Resources {
            vcpus,
            memory_mib,
            disk_gib,
        }
    }

    fn w(id: &str, demand: Resources) -> Waiting {
        Waiting {
            job_id: id.into(),
            demand,
            has_disk: false,
        }
    }

    #[test]
    fn fifo_admission_stops_at_the_first_job_that_does_not_fit() {
        let total = r(4, 4096, 100);
        let queue = [
            w("1", r(2, 1024, 10)),
            w("2", r(4, 1024, 10)),
            w("3", r(1, 512, 10)),
        ];
        let a = admit(total, r(1, 0, 0), &queue);
        assert_eq!(a.admitted, ["1"]);
        let (blocked, why) = a.blocked.unwrap();
        assert_eq!(blocked, "2");
        assert!(
            why.contains("needs 4 vCPU, 1024 MiB memory, 10 GiB disk"),
            "{why}"
        );
    }

    #[test]
    fn resumed_jobs_do_not_ask_for_their_disk_again() {
        let total = r(4, 4096, 10);
        let held = r(0, 0, 10);
        let resumed = Waiting {
            job_id: "1".into(),
            demand: r(1, 1024, 10),
            has_disk: true,
        };
        assert_eq!(admit(total, held, &[resumed]).admitted, ["1"]);
        assert!(admit(total, held, &[w("2", r(1, 1024, 10))])
            .admitted
            .is_empty());
    }

    #[test]
    fn a_job_larger_than_the_host_says_so() {
        let a = admit(r(2, 1024, 10), r(0, 0, 0), &[w("1", r(8, 1024, 1))]);
        assert!(a
            .blocked
            .unwrap()
            .1
            .contains("more than this host has in total"));
    }

    #[test]
    fn overcommit_and_reserve_shape_the_schedulable_total() {
        let host = HostCapacity {
            cpus: 2,
            memory_mib: 8192,
            disk_gib: 100,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.5,
            disk_overcommit: 1.0,
            reserved_memory_mib: 1024,
        };
        assert_eq!(host.schedulable(), r(8, 10752, 100));
    }

    proptest! {
        #[test]
        fn admitted_jobs_always_fit_together(
            total in (0u64..16, 0u64..8192, 0u64..100),
            held in (0u64..16, 0u64..8192, 0u64..100),
            demands in prop::collection::vec((0u64..8, 0u64..4096, 0u64..50), 0..10),
        ) {
            let total = r(total.0, total.1, total.2);
            let held = r(held.0, held.1, held.2);
            let queue: Vec<Waiting> = demands.iter().enumerate()
                .map(|(i, d)| w(&i.to_string(), r(d.0, d.1, d.2))).collect();
            let a = admit(total, held, &queue);
            // Admitted jobs are a prefix of the queue, and together fit in the free room.
            let sum = queue.iter().take(a.admitted.len()).fold(Resources::default(), |s, j| s.plus(j.demand));
            prop_assert!(sum.fits_in(total.minus(held)));
            for (i, id) in a.admitted.iter().enumerate() {
                prop_assert_eq!(id, &queue[i].job_id);
            }
            if let Some((blocked, _)) = a.blocked {
                prop_assert_eq!(&blocked, &queue[a.admitted.len()].job_id);
            } else {
                prop_assert_eq!(a.admitted.len(), queue.len());
            }
        }
    }
}
