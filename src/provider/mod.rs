//! vmhost as one of UCloud/Core's compute providers (`[ucloud]` in the config).
//!
//! Core calls vmhost's provider endpoints (`/ucloud/{provider}/jobs...`, handled in
//! `api::provider`) with an RS256 JWT signed by the provider's key pair, which [`auth`]
//! verifies. Core does not change a job's state itself: vmhost reports every update of the jobs
//! Core created through Core's control API ([`control`]), in order and until acknowledged
//! ([`reporter`]). Jobs Core created run exactly as standalone jobs do; the store maps Core's
//! ids to vmhost's (`store::core_jobs`).

pub mod auth;
pub mod control;
pub mod reporter;
