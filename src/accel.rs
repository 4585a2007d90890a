//! Placeholder until the accelerator probe lands.
use serde::Deserialize;
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting { Kvm, Tcg, Auto }
#[derive(Debug, thiserror::Error)]
pub enum AccelError { #[error("x")] X }
pub async fn resolve(_s: AccelSetting) -> Result<crate::backend::Accel, AccelError> { Ok(crate::backend::Accel::Tcg) }
