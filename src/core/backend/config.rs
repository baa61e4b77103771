//! Backend settings and their validation, as vLLM validates them.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `uva`: offload up to `cpu_offload_bytes` of layer parameters, optionally only those matching
/// `params`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UvaConfig {
    pub cpu_offload_bytes: u64,
    pub params: Vec<String>,
}

/// `prefetch`: in each group of `group_size` layers the last `num_in_group` are offloaded and
/// prefetched `prefetch_step` layers ahead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchConfig {
    pub group_size: u32,
    pub num_in_group: u32,
    pub prefetch_step: u32,
    pub params: Vec<String>,
}

/// Serialized (in the journal) tagged by kind: `{"kind": "uva", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendConfig {
    Uva(UvaConfig),
    Prefetch(PrefetchConfig),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackendError {
    #[error("prefetch.group_size must be >= 1 (got {0})")]
    GroupSize(u32),
    #[error(
        "prefetch.num_in_group must satisfy 1 <= num_in_group <= group_size (got {num_in_group}, group_size {group_size})"
    )]
    NumInGroup { num_in_group: u32, group_size: u32 },
    #[error("prefetch.prefetch_step must be >= 1 (got {0})")]
    PrefetchStep(u32),
    #[error("params entry {0:?} is empty or has empty dotted segments")]
    BadParam(String),
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Uva(_) => "uva",
            BackendConfig::Prefetch(_) => "prefetch",
        }
    }

    /// Checks vLLM's rules. Returns a warning for settings that are legal but wasteful.
    pub fn validate(&self) -> Result<Option<String>, BackendError> {
        let params = match self {
            BackendConfig::Uva(u) => &u.params,
            BackendConfig::Prefetch(p) => &p.params,
        };
        if let Some(bad) = params
            .iter()
            .find(|p| p.is_empty() || p.split('.').any(str::is_empty))
        {
            return Err(BackendError::BadParam(bad.clone()));
        }
        let BackendConfig::Prefetch(p) = self else {
            return Ok(None);
        };
        if p.group_size < 1 {
            return Err(BackendError::GroupSize(p.group_size));
        }
        if p.num_in_group < 1 || p.num_in_group > p.group_size {
            return Err(BackendError::NumInGroup {
                num_in_group: p.num_in_group,
                group_size: p.group_size,
            });
        }
        if p.prefetch_step < 1 {
            return Err(BackendError::PrefetchStep(p.prefetch_step));
        }
        Ok((p.prefetch_step < p.num_in_group).then(|| {
            format!(
                "prefetch_step {} < num_in_group {}: consecutive offloaded layers cannot all be prefetched in time",
                p.prefetch_step, p.num_in_group
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pf(g: u32, n: u32, s: u32) -> BackendConfig {
        BackendConfig::Prefetch(PrefetchConfig {
            group_size: g,
            num_in_group: n,
            prefetch_step: s,
            params: vec![],
        })
    }

    #[test]
    fn validation_follows_vllm() {
        assert_eq!(pf(0, 0, 1).validate(), Err(BackendError::GroupSize(0)));
        assert!(matches!(
            pf(2, 0, 1).validate(),
            Err(BackendError::NumInGroup { .. })
        ));
        assert!(matches!(
            pf(2, 3, 1).validate(),
            Err(BackendError::NumInGroup { .. })
        ));
        assert_eq!(pf(2, 1, 0).validate(), Err(BackendError::PrefetchStep(0)));
        assert_eq!(pf(4, 2, 2).validate(), Ok(None));
        assert!(
            pf(4, 3, 1)
                .validate()
                .unwrap()
                .unwrap()
                .contains("prefetch_step")
        );
        let uva = BackendConfig::Uva(UvaConfig {
            cpu_offload_bytes: 1,
            params: vec!["a..b".into()],
        });
        assert!(matches!(uva.validate(), Err(BackendError::BadParam(_))));
    }
}
