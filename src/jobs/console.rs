//! Tailing the serial console logs that virtlogd writes for each VM.

use std::io::SeekFrom;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::store::VmRecord;

/// Read at most this much per file per poll, so one chatty VM cannot stall a follower.
const MAX_CHUNK: u64 = 256 * 1024;

/// Follows the console logs of a job's VMs from a starting point.
#[derive(Debug, Default)]
pub struct ConsoleTail {
    files: Vec<TailedFile>,
    backlog: u64,
}

#[derive(Debug)]
struct TailedFile {
    rank: u32,
    path: PathBuf,
    /// `None` until the first read decides where to start.
    offset: Option<u64>,
}

impl ConsoleTail {
    /// A tail that starts each file at most `backlog` bytes before its current end.
    pub fn new(backlog: u64) -> ConsoleTail {
        ConsoleTail {
            files: Vec::new(),
            backlog,
        }
    }

    /// Adds VMs that appeared since the last call (replicas are provisioned one by one).
    pub fn track(&mut self, vms: &[VmRecord]) {
        for vm in vms {
            if !self.files.iter().any(|f| f.path == vm.console_log) {
                self.files.push(TailedFile {
                    rank: vm.rank,
                    path: vm.console_log.clone(),
                    offset: None,
                });
            }
        }
    }

    /// New console output per rank since the last call, decoded lossily.
    pub async fn read_new(&mut self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        for file in &mut self.files {
            let Ok(mut f) = tokio::fs::File::open(&file.path).await else {
                continue;
            };
            let Ok(meta) = f.metadata().await else {
                continue;
            };
            let len = meta.len();
            let start = match file.offset {
                // A file that shrank was replaced: start over.
                Some(offset) if offset <= len => offset,
                Some(_) => 0,
                None => len.saturating_sub(self.backlog),
            };
            if start == len {
                file.offset = Some(len);
                continue;
            }
            let want = (len - start).min(MAX_CHUNK);
            let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
            if f.seek(SeekFrom::Start(start)).await.is_err() {
                continue;
            }
            if (&mut f).take(want).read_to_end(&mut buf).await.is_err() {
                continue;
            }
            file.offset = Some(start + buf.len() as u64);
            if !buf.is_empty() {
                out.push((file.rank, String::from_utf8_lossy(&buf).into_owned()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(dir: &std::path::Path, rank: u32) -> VmRecord {
        VmRecord {
            job_id: "1".into(),
            rank,
            domain: format!("d-{rank}"),
            dir: dir.into(),
            overlay: dir.join("o"),
            seed: dir.join("s"),
            console_log: dir.join(format!("console-{rank}.log")),
        }
    }

    #[tokio::test]
    async fn tails_from_backlog_then_only_new_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let v = vm(dir.path(), 0);
        std::fs::write(&v.console_log, "0123456789").unwrap();
        let mut tail = ConsoleTail::new(4);
        tail.track(&[v.clone(), v.clone()]);
        assert_eq!(tail.read_new().await, vec![(0, "6789".to_owned())]);
        assert!(tail.read_new().await.is_empty());
        std::fs::write(&v.console_log, "0123456789abc").unwrap();
        assert_eq!(tail.read_new().await, vec![(0, "abc".to_owned())]);
    }

    #[tokio::test]
    async fn missing_files_are_picked_up_when_they_appear() {
        let dir = tempfile::tempdir().unwrap();
        let v = vm(dir.path(), 1);
        let mut tail = ConsoleTail::new(1024);
        tail.track(std::slice::from_ref(&v));
        assert!(tail.read_new().await.is_empty());
        std::fs::write(&v.console_log, "boot\n").unwrap();
        assert_eq!(tail.read_new().await, vec![(1, "boot\n".to_owned())]);
    }
}
