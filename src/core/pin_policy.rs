//! The shared pin policy: the one function that decides whether a pool is pinned.
//!
//! It mirrors vLLM's `should_pin_memory()` — `is_pin_memory_available() and not
//! VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY` — evaluated in the same order, plus one clause of our
//! own: on coherent platforms (GH200/GB200) pinned host memory is carved from GPU memory and buys
//! little, so `pin.avoid_on_coherent` declines it. The decision is taken once, when a pool is
//! created, stored on the pool and handed to every worker.

use std::fmt;

use crate::config::PinConfig;
use crate::device::Capabilities;
use crate::vllm_env::{DISABLE_PIN_MEMORY, VllmEnv};

/// Which clause decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinReason {
    /// Every clause allowed pinning.
    Allowed,
    /// `is_pin_memory_available()` was false; the text says why.
    Unavailable(String),
    /// `VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY` is set to a non-zero integer.
    DisabledByEnv,
    /// Coherent platform with `pin.avoid_on_coherent = true`.
    CoherentPlatform,
    /// The policy said pin, but mlock or registration failed at creation; the pool was created
    /// unpinned instead of failing.
    PinFailed(String),
}

/// The decision stored on a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDecision {
    pub pin: bool,
    pub reason: PinReason,
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct PinInputs<'a> {
    pub capabilities: &'a Capabilities,
    pub env: &'a VllmEnv,
    pub config: &'a PinConfig,
}

/// Decides whether to pin. Pure: same inputs, same answer.
pub fn decide(inputs: PinInputs<'_>) -> PinDecision {
    let no = |reason| PinDecision { pin: false, reason };
    if let Err(why) = &inputs.capabilities.pin {
        return no(PinReason::Unavailable(why.clone()));
    }
    if inputs.env.disable_pin_memory {
        return no(PinReason::DisabledByEnv);
    }
    if inputs.capabilities.coherent && inputs.config.avoid_on_coherent {
        return no(PinReason::CoherentPlatform);
    }
    PinDecision {
        pin: true,
        reason: PinReason::Allowed,
    }
}

impl PinDecision {
    /// The decision after an attempt to pin failed.
    pub fn failed(error: impl fmt::Display) -> Self {
        Self {
            pin: false,
            reason: PinReason::PinFailed(error.to_string()),
        }
    }
}

impl fmt::Display for PinReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinReason::Allowed => write!(
                f,
                "pinned: pinning is available and {DISABLE_PIN_MEMORY} is not set"
            ),
            PinReason::Unavailable(why) => write!(f, "not pinned: pinning unavailable: {why}"),
            PinReason::DisabledByEnv => write!(f, "not pinned: {DISABLE_PIN_MEMORY} is set"),
            PinReason::CoherentPlatform => write!(
                f,
                "not pinned: coherent platform (device reads pageable memory through host page tables) and pin.avoid_on_coherent = true"
            ),
            PinReason::PinFailed(why) => write!(f, "not pinned: pinning failed at creation: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(available: bool, coherent: bool) -> Capabilities {
        Capabilities {
            pin: if available {
                Ok(())
            } else {
                Err("no mlock".into())
            },
            coherent,
            max_pinnable_bytes: 0,
            free_memory_bytes: None,
        }
    }

    /// Every combination of the four inputs, against the expected clause.
    #[test]
    fn every_clause_and_combination() {
        use PinReason::*;
        // (available, env disables, coherent, avoid_on_coherent) -> (pin, reason)
        type Inputs = (bool, bool, bool, bool);
        let table: &[(Inputs, (bool, PinReason))] = &[
            ((true, false, false, false), (true, Allowed)),
            ((true, false, false, true), (true, Allowed)),
            ((true, false, true, false), (true, Allowed)),
            ((true, false, true, true), (false, CoherentPlatform)),
            ((true, true, false, false), (false, DisabledByEnv)),
            ((true, true, false, true), (false, DisabledByEnv)),
            ((true, true, true, false), (false, DisabledByEnv)),
            ((true, true, true, true), (false, DisabledByEnv)),
            (
                (false, false, false, false),
                (false, Unavailable("no mlock".into())),
            ),
            (
                (false, false, false, true),
                (false, Unavailable("no mlock".into())),
            ),
            (
                (false, false, true, false),
                (false, Unavailable("no mlock".into())),
            ),
            (
                (false, false, true, true),
                (false, Unavailable("no mlock".into())),
            ),
            (
                (false, true, false, false),
                (false, Unavailable("no mlock".into())),
            ),
            (
                (false, true, false, true),
                (false, Unavailable("no mlock".into())),
            ),
            (
                (false, true, true, false),
                (false, Unavailable("no mlock".into())),
            ),
            (
                (false, true, true, true),
                (false, Unavailable("no mlock".into())),
            ),
        ];
        assert_eq!(table.len(), 16);
        for ((available, env, coherent, avoid), (pin, reason)) in table {
            let c = caps(*available, *coherent);
            let e = VllmEnv {
                disable_pin_memory: *env,
                disable_uva: false,
            };
            let cfg = PinConfig {
                avoid_on_coherent: *avoid,
                ..PinConfig::default()
            };
            let d = decide(PinInputs {
                capabilities: &c,
                env: &e,
                config: &cfg,
            });
            assert_eq!(
                d,
                PinDecision {
                    pin: *pin,
                    reason: reason.clone()
                },
                "inputs {:?}",
                (available, env, coherent, avoid)
            );
        }
    }

    #[test]
    fn reasons_name_the_deciding_clause() {
        assert!(
            PinReason::DisabledByEnv
                .to_string()
                .contains(DISABLE_PIN_MEMORY)
        );
        assert!(
            PinReason::CoherentPlatform
                .to_string()
                .contains("pin.avoid_on_coherent")
        );
        assert!(
            PinReason::Unavailable("RLIMIT_MEMLOCK".into())
                .to_string()
                .contains("RLIMIT_MEMLOCK")
        );
        assert!(
            PinDecision::failed("EAGAIN")
                .reason
                .to_string()
                .contains("EAGAIN")
        );
    }

    #[test]
    fn uva_variable_does_not_affect_pinning() {
        let c = caps(true, false);
        let e = VllmEnv {
            disable_pin_memory: false,
            disable_uva: true,
        };
        let d = decide(PinInputs {
            capabilities: &c,
            env: &e,
            config: &PinConfig::default(),
        });
        assert!(d.pin);
    }
}
