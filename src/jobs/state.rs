//! The job state machine: pure, no I/O, no tokio.
//!
//! ```text
//!             Provisioned                 Stopped(cause)
//!  IN_QUEUE ───────────────▶ RUNNING ─────────────────────▶ SUSPENDED
//!     │  ▲                     │  ▲                            │
//!     │  └──────── Unsuspend ──┼──┼────────────────────────────┘
//!     │                        │  └── Rebooted (stays RUNNING)
//!     │ ProvisionFailed        │ Vanished
//!     ▼                        ▼
//!  FAILURE ◀───────────────────┘
//!
//!  any active state ── Terminated ──▶ SUCCESS      any active state ── Expired ──▶ EXPIRED
//! ```
//!
//! SUCCESS, FAILURE and EXPIRED are final: no event leaves them. A terminate request is
//! accepted in every active state and refused in a final one.

use serde::{Deserialize, Serialize};

/// The state of a job, with UCloud's names on the wire and in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    InQueue,
    Running,
    Canceling,
    Success,
    Failure,
    Expired,
    Suspended,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::InQueue,
        JobState::Running,
        JobState::Canceling,
        JobState::Success,
        JobState::Failure,
        JobState::Expired,
        JobState::Suspended,
    ];

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Success | JobState::Failure | JobState::Expired
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::InQueue => "IN_QUEUE",
            JobState::Running => "RUNNING",
            JobState::Canceling => "CANCELING",
            JobState::Success => "SUCCESS",
            JobState::Failure => "FAILURE",
            JobState::Expired => "EXPIRED",
            JobState::Suspended => "SUSPENDED",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// Why a running VM stopped without vmhost asking it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// The guest powered itself off.
    FromInside,
    /// Someone destroyed the domain from the host, outside vmhost.
    FromHost,
    /// The QEMU process crashed or was killed.
    Crashed,
}

/// Something that happened to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEvent {
    /// Every replica's domain is running.
    Provisioned,
    /// Preparing or booting a replica failed; everything created was removed.
    ProvisionFailed,
    /// The user asked to terminate; the runner will tear down.
    TerminateRequested,
    /// Every replica was removed after a terminate.
    Terminated,
    /// A replica stopped without vmhost asking.
    Stopped(StopKind),
    /// A replica's domain no longer exists on the hypervisor.
    Vanished,
    /// The user asked to power the job off.
    SuspendRequested,
    /// The user asked to power a suspended job on again.
    UnsuspendRequested,
    /// The time allocation ran out and the VM was removed.
    Expired,
}

/// Why an event is not allowed in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the job has already finished")]
    AlreadyFinal,
    #[error("the job is not running")]
    NotRunning,
    #[error("the job is not suspended")]
    NotSuspended,
    #[error("the event does not apply in this state")]
    NotApplicable,
}

/// The state after `event` happens in `state`, or why it cannot happen.
pub fn transition(state: JobState, event: JobEvent) -> Result<JobState, Denied> {
    use JobEvent as E;
    use JobState as S;
    if state.is_final() {
        return Err(Denied::AlreadyFinal);
    }
    match (state, event) {
        (S::InQueue, E::Provisioned) => Ok(S::Running),
        (S::InQueue, E::ProvisionFailed) => Ok(S::Failure),
        (_, E::TerminateRequested) => Ok(state),
        (_, E::Terminated) => Ok(S::Success),
        (_, E::Expired) => Ok(S::Expired),
        (S::Running, E::Stopped(_)) => Ok(S::Suspended),
        (S::Running | S::Suspended | S::InQueue, E::Vanished) => Ok(S::Failure),
        (S::Running, E::SuspendRequested) => Ok(S::Suspended),
        (_, E::SuspendRequested) => Err(Denied::NotRunning),
        (S::Suspended, E::UnsuspendRequested) => Ok(S::InQueue),
        (_, E::UnsuspendRequested) => Err(Denied::NotSuspended),
        _ => Err(Denied::NotApplicable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use JobEvent as E;
    use JobState as S;

    #[test]
    fn table_of_transitions() {
        let table: &[(S, E, Result<S, Denied>)] = &[
            (S::InQueue, E::Provisioned, Ok(S::Running)),
            (S::InQueue, E::ProvisionFailed, Ok(S::Failure)),
            (S::InQueue, E::TerminateRequested, Ok(S::InQueue)),
            (S::InQueue, E::Terminated, Ok(S::Success)),
            (
                S::InQueue,
                E::Stopped(StopKind::FromInside),
                Err(Denied::NotApplicable),
            ),
            (S::InQueue, E::SuspendRequested, Err(Denied::NotRunning)),
            (S::Running, E::Provisioned, Err(Denied::NotApplicable)),
            (
                S::Running,
                E::Stopped(StopKind::FromInside),
                Ok(S::Suspended),
            ),
            (S::Running, E::Stopped(StopKind::Crashed), Ok(S::Suspended)),
            (S::Running, E::Vanished, Ok(S::Failure)),
            (S::Running, E::Terminated, Ok(S::Success)),
            (S::Running, E::Expired, Ok(S::Expired)),
            (S::Running, E::SuspendRequested, Ok(S::Suspended)),
            (S::Running, E::UnsuspendRequested, Err(Denied::NotSuspended)),
            (S::Suspended, E::UnsuspendRequested, Ok(S::InQueue)),
            (S::Suspended, E::Terminated, Ok(S::Success)),
            (
                S::Suspended,
                E::Stopped(StopKind::FromHost),
                Err(Denied::NotApplicable),
            ),
            (S::Success, E::TerminateRequested, Err(Denied::AlreadyFinal)),
            (S::Failure, E::Provisioned, Err(Denied::AlreadyFinal)),
            (S::Expired, E::UnsuspendRequested, Err(Denied::AlreadyFinal)),
        ];
        for &(state, event, expected) in table {
            assert_eq!(transition(state, event), expected, "{state:?} + {event:?}");
        }
    }

    #[test]
    fn state_names_round_trip() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        assert_eq!(JobState::parse("running"), None);
    }

    fn any_event() -> impl Strategy<Value = JobEvent> {
        prop_oneof![
            Just(E::Provisioned),
            Just(E::ProvisionFailed),
            Just(E::TerminateRequested),
            Just(E::Terminated),
            Just(E::Stopped(StopKind::FromInside)),
            Just(E::Stopped(StopKind::FromHost)),
            Just(E::Stopped(StopKind::Crashed)),
            Just(E::Vanished),
            Just(E::SuspendRequested),
            Just(E::UnsuspendRequested),
            Just(E::Expired),
        ]
    }

    proptest! {
        #[test]
        fn final_states_absorb_and_terminate_always_ends(events in prop::collection::vec(any_event(), 0..40)) {
            let mut state = S::InQueue;
            let mut was_final = false;
            for event in events {
                match transition(state, event) {
                    Ok(next) => {
                        prop_assert!(!was_final, "left final state {state:?} via {event:?}");
                        state = next;
                    }
                    Err(denied) => prop_assert!(!was_final || denied == Denied::AlreadyFinal),
                }
                was_final = state.is_final();
            }
            if !state.is_final() {
                prop_assert_eq!(transition(state, E::Terminated), Ok(S::Success));
            }
        }
    }
}
