//! Where a job's VMs live on the host: domain names and file paths.
//!
//! All of it is derived from `(job id, rank)` so that reconciliation can recompute it and two
//! vmhost instances sharing one libvirt (with different prefixes) never collide.

use std::path::PathBuf;

use crate::store::VmRecord;

#[derive(Debug, Clone)]
pub struct VmNaming {
    pub prefix: String,
    pub vm_dir: PathBuf,
    pub agent_id: String,
}

impl VmNaming {
    pub fn domain(&self, job_id: &str, rank: u32) -> String {
        format!("{}-{job_id}-{rank}", self.prefix)
    }

    /// `(job id, rank)` of a domain named by [`VmNaming::domain`].
    pub fn parse_domain(&self, name: &str) -> Option<(String, u32)> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        let (job, rank) = rest.rsplit_once('-')?;
        if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((job.to_owned(), rank.parse().ok()?))
    }

    pub fn record(&self, job_id: &str, rank: u32) -> VmRecord {
        let domain = self.domain(job_id, rank);
        let dir = self.vm_dir.join(&domain);
        VmRecord {
            job_id: job_id.to_owned(),
            rank,
            overlay: dir.join("disk.qcow2"),
            seed: dir.join("seed.img"),
            console_log: dir.join("console.log"),
            dir,
            domain,
        }
    }

    /// cloud-init's instance-id: stable for the life of the VM, so first-boot modules run once.
    pub fn instance_id(job_id: &str, rank: u32) -> String {
        if rank == 0 {
            job_id.to_owned()
        } else {
            format!("{job_id}-{rank}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naming() -> VmNaming {
        VmNaming {
            prefix: "vmhost-a".into(),
            vm_dir: "/d/vms".into(),
            agent_id: "x".into(),
        }
    }

    #[test]
    fn domain_names_round_trip_and_foreign_names_are_rejected() {
        let n = naming();
        assert_eq!(n.domain("42", 3), "vmhost-a-42-3");
        assert_eq!(n.parse_domain("vmhost-a-42-3"), Some(("42".into(), 3)));
        for foreign in [
            "vmhost-b-42-3",
            "vmhost-a-x-1",
            "vmhost-a--1",
            "vmhost-a-42",
            "other",
        ] {
            assert_eq!(n.parse_domain(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn files_live_in_one_directory_per_domain() {
        let r = naming().record("7", 0);
        assert_eq!(r.dir, PathBuf::from("/d/vms/vmhost-a-7-0"));
        assert!(r.overlay.starts_with(&r.dir) && r.seed.starts_with(&r.dir));
        assert!(r.console_log.starts_with(&r.dir));
    }
}
