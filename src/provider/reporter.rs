//! Pushes the updates of Core's jobs to Core, in order, until Core acknowledges them.
//!
//! One task owns the delivery. Each round it reads up to [`ReporterSettings::batch`]
//! unreported updates from the store (oldest first per job), sends them to Core in one
//! `jobs/control/update` call and, only once Core accepted them, records each job's highest
//! `seq` sent as reported. The store is the queue: what Core has not accepted is read again
//! next round, so an unreachable Core or a restart delays updates but never loses or reorders
//! them. The cost is at-least-once delivery: if vmhost stops (or the store write fails) after
//! Core accepted a batch and before it was recorded, that batch is sent again.
//!
//! ```text
//!            +------------ accepted, fewer than `batch` sent ------------+
//!            v                                                          |
//!        waiting --- a JobChange, or `poll` elapsed ---> delivering ----+
//!                                                        |   ^    ^  |
//!                                       failed (store or |   |    +--+ accepted, a full
//!                                       Core); warn once |   |         batch: at once
//!                                       per streak       v   | backoff elapsed
//!                                                     backing off  (1 s, 2 s, ... 60 s)
//! ```
//!
//! The first round runs at once, so a backlog left by a previous run goes out at startup. A
//! `JobChange` only says "look at the store now"; its content is not used, so a lagged
//! receiver loses nothing. Changes that arrive while backing off do not cut the backoff short.
//! A failure streak is logged at warn once, its end at info.
//!
//! A batch Core refuses for good (a 4xx other than 401, 408 or 429) is sent again job by job:
//! the job whose updates Core refuses (one it deleted, say) is set aside with a warning, so it
//! cannot hold up every later update, and the others are delivered. Any other failure retries
//! the whole batch after the backoff.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::control::{ControlError, CoreClient};
use crate::jobs::JobChange;
use crate::store::{CoreReport, Store, StoreError};
use crate::telemetry::error_chain;

/// How the reporter paces itself; [`Default`] is what vmhost runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReporterSettings {
    /// At most this many updates go in one call to Core.
    pub batch: usize,
    /// The store is read at least this often, with or without a `JobChange`.
    pub poll: Duration,
    /// The wait after the first failure; it doubles with each further failure...
    pub first_backoff: Duration,
    /// ...up to this.
    pub max_backoff: Duration,
}

impl Default for ReporterSettings {
    fn default() -> Self {
        ReporterSettings {
            batch: 200,
            poll: Duration::from_secs(5),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReporterError {
    #[error("cannot read or record the unreported updates of Core's jobs")]
    Store(#[source] StoreError),
    #[error("Core did not accept the job updates")]
    Core(#[source] ControlError),
}

/// Starts delivering with the default settings; see [`spawn_with`].
pub fn spawn(
    store: Store,
    client: CoreClient,
    changes: broadcast::Receiver<JobChange>,
) -> JoinHandle<()> {
    spawn_with(store, client, changes, ReporterSettings::default())
}

/// Starts the reporter task. It runs until aborted; aborting it at any point is safe (see the
/// module doc). `changes` (from `JobManager::subscribe`) wakes it; once that channel closes it
/// keeps polling the store.
pub fn spawn_with(
    store: Store,
    client: CoreClient,
    changes: broadcast::Receiver<JobChange>,
    settings: ReporterSettings,
) -> JoinHandle<()> {
    tokio::spawn(
        run(store, client, changes, settings).instrument(tracing::info_span!("core_reporter")),
    )
}

async fn run(
    store: Store,
    client: CoreClient,
    changes: broadcast::Receiver<JobChange>,
    settings: ReporterSettings,
) {
    let batch = settings.batch.max(1);
    // `None` once the manager's channel closed: from then on only `poll` wakes the task.
    let mut changes = Some(changes);
    let mut backoff = Backoff::new(settings.first_backoff, settings.max_backoff);
    let mut streak = Streak::default();
    loop {
        // Before reading the store, so that a change published after the read wakes the next
        // round rather than being swallowed here.
        if let Some(rx) = changes.as_mut() {
            if !drain(rx) {
                changes = None;
            }
        }
        match deliver(&store, &client, batch).await {
            Ok(sent) => {
                if let Some(failures) = streak.succeeded() {
                    tracing::info!(failures, "Core accepts job updates again");
                }
                backoff.reset();
                if sent < batch {
                    wait_for_change(&mut changes, settings.poll).await;
                }
            }
            Err(err) => {
                let delay = backoff.next_delay();
                if streak.failed() {
                    tracing::warn!(
                        error = %error_chain(&err),
                        "cannot deliver job updates to Core; retrying with backoff until it accepts them"
                    );
                } else {
                    tracing::debug!(
                        error = %error_chain(&err),
                        retry_in_ms = delay.as_millis(),
                        "job updates still not delivered to Core"
                    );
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One round: sends the oldest unreported updates and records what Core accepted. Returns how
/// many were sent.
async fn deliver(store: &Store, client: &CoreClient, batch: usize) -> Result<usize, ReporterError> {
    let reports = store
        .unreported_updates(batch)
        .await
        .map_err(ReporterError::Store)?;
    if reports.is_empty() {
        return Ok(0);
    }
    match client.update_jobs(&reports).await {
        Ok(()) => {}
        Err(err) if refused_for_good(&err) => {
            deliver_job_by_job(store, client, &reports).await?;
            return Ok(reports.len());
        }
        Err(err) => return Err(ReporterError::Core(err)),
    }
    store
        .mark_reported(acknowledged(&reports))
        .await
        .map_err(ReporterError::Store)?;
    tracing::debug!(count = reports.len(), "Core accepted job updates");
    Ok(reports.len())
}

/// Core refused the batch in a way retrying will not change (a 4xx other than 401, 408 and
/// 429): some job's updates are unacceptable to it, say a job Core has deleted since.
fn refused_for_good(err: &ControlError) -> bool {
    match err {
        ControlError::Refused { status, .. } => {
            status.is_client_error() && ![401, 408, 429].contains(&status.as_u16())
        }
        _ => false,
    }
}

/// Sends each job's updates on their own, so that the job Core refuses for good does not hold
/// up the others: its updates are set aside (logged, and recorded as reported) and the rest
/// are delivered. Any other failure ends the round, keeping what was delivered so far.
async fn deliver_job_by_job(
    store: &Store,
    client: &CoreClient,
    reports: &[CoreReport],
) -> Result<(), ReporterError> {
    for job in reports.chunk_by(|a, b| a.job_id == b.job_id) {
        match client.update_jobs(job).await {
            Ok(()) => {}
            Err(err) if refused_for_good(&err) => {
                tracing::warn!(core_id = %job[0].core_id, updates = job.len(),
                    error = %error_chain(&err), "Core refuses these updates of its job; they are set aside");
            }
            Err(err) => return Err(ReporterError::Core(err)),
        }
        store
            .mark_reported(acknowledged(job))
            .await
            .map_err(ReporterError::Store)?;
    }
    Ok(())
}

/// Each job's highest `seq` among `reports`. The store hands out a gap-free prefix of each
/// job's unreported updates, so everything up to that `seq` was sent.
fn acknowledged(reports: &[CoreReport]) -> Vec<(String, u32)> {
    let mut highest: BTreeMap<&str, u32> = BTreeMap::new();
    for report in reports {
        let seq = highest.entry(&report.job_id).or_insert(report.seq);
        *seq = (*seq).max(report.seq);
    }
    highest
        .into_iter()
        .map(|(job, seq)| (job.to_owned(), seq))
        .collect()
}

/// Discards queued changes: the coming store read covers them. `false` once the channel closed.
fn drain(rx: &mut broadcast::Receiver<JobChange>) -> bool {
    loop {
        match rx.try_recv() {
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Closed) => return false,
        }
    }
}

/// Returns on the next change or after `poll`, whichever comes first.
async fn wait_for_change(changes: &mut Option<broadcast::Receiver<JobChange>>, poll: Duration) {
    let Some(rx) = changes.as_mut() else {
        tokio::time::sleep(poll).await;
        return;
    };
    let closed = tokio::select! {
        received = rx.recv() => matches!(received, Err(RecvError::Closed)),
        () = tokio::time::sleep(poll) => false,
    };
    if closed {
        tracing::debug!("job changes ended; reading the store every poll interval only");
        *changes = None;
    }
}

/// Exponential backoff: `first`, doubling each failure, capped at `max`.
#[derive(Debug)]
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first.min(max),
        }
    }

    /// The wait after a failure.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = delay.saturating_mul(2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

/// Consecutive failures, so that a streak is logged once rather than on every attempt.
#[derive(Debug, Default)]
struct Streak {
    failures: u32,
}

impl Streak {
    /// Counts a failure; `true` if it starts a streak.
    fn failed(&mut self) -> bool {
        self.failures = self.failures.saturating_add(1);
        self.failures == 1
    }

    /// Ends the streak; how many failures it had, if there was one.
    fn succeeded(&mut self) -> Option<u32> {
        Some(std::mem::take(&mut self.failures)).filter(|&n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::record::JobUpdate;

    fn report(job: &str, seq: u32) -> CoreReport {
        CoreReport {
            core_id: format!("core-{job}"),
            job_id: job.to_owned(),
            seq,
            update: JobUpdate {
                timestamp: 0,
                state: None,
                status: None,
            },
        }
    }

    #[test]
    fn each_job_is_acknowledged_up_to_its_highest_seq_sent() {
        let reports = [
            report("7", 2),
            report("7", 3),
            report("12", 5),
            report("7", 4),
        ];
        assert_eq!(
            acknowledged(&reports),
            vec![("12".to_owned(), 5), ("7".to_owned(), 4)]
        );
        assert_eq!(acknowledged(&[]), Vec::new());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn backoff_never_exceeds_the_cap_nor_overflows() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        let mut huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.next_delay(), Duration::MAX);
        assert_eq!(huge.next_delay(), Duration::MAX);
    }

    #[test]
    fn a_failure_streak_is_announced_once_and_its_end_reported() {
        let mut s = Streak::default();
        assert_eq!(s.succeeded(), None);
        assert!(s.failed());
        assert!(!s.failed());
        assert!(!s.failed());
        assert_eq!(s.succeeded(), Some(3));
        assert_eq!(s.succeeded(), None);
        assert!(s.failed());
    }

    #[test]
    fn draining_reports_whether_changes_still_come() {
        let (tx, mut rx) = broadcast::channel(1);
        let change = JobChange {
            job_id: "1".to_owned(),
            update: JobUpdate {
                timestamp: 0,
                state: None,
                status: None,
            },
        };
        // Three sends into a channel of one: the receiver lags, which drain treats as a change.
        for _ in 0..3 {
            tx.send(change.clone()).unwrap();
        }
        assert!(drain(&mut rx));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        drop(tx);
        assert!(!drain(&mut rx));
    }
}
