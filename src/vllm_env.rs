//! vLLM's weight-offloading variables, parsed exactly as `vllm/envs.py` does:
//! `bool(int(os.getenv(NAME, "0")))`.

use thiserror::Error;

pub const DISABLE_PIN_MEMORY: &str = "VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY";
pub const DISABLE_UVA: &str = "VLLM_WEIGHT_OFFLOADING_DISABLE_UVA";

/// The two variables, as vLLM would see them in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VllmEnv {
    pub disable_pin_memory: bool,
    pub disable_uva: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum VllmEnvError {
    /// vLLM raises `ValueError` here; starting with a different reading than vLLM's would make the
    /// daemon and the engine disagree about pinning, so refuse to start.
    #[error(
        "{var}={value:?} is not an integer; vLLM reads it with int(), so use 0 (off) or 1 (on), or unset it"
    )]
    NotAnInteger { var: &'static str, value: String },
}

impl VllmEnv {
    /// Reads both variables through `get`, which stands in for `os.getenv`.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Self, VllmEnvError> {
        Ok(Self {
            disable_pin_memory: parse_flag(DISABLE_PIN_MEMORY, get(DISABLE_PIN_MEMORY))?,
            disable_uva: parse_flag(DISABLE_UVA, get(DISABLE_UVA))?,
        })
    }

    pub fn from_process() -> Result<Self, VllmEnvError> {
        Self::parse(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }
}

fn parse_flag(var: &'static str, value: Option<String>) -> Result<bool, VllmEnvError> {
    match value {
        None => Ok(false),
        Some(v) => python_int_is_nonzero(&v).ok_or(VllmEnvError::NotAnInteger { var, value: v }),
    }
}

/// Python's `int(str)` for base 10: surrounding whitespace, an optional sign, digits with single
/// underscores between them. Returns whether the value is non-zero, or None where Python raises.
fn python_int_is_nonzero(s: &str) -> Option<bool> {
    let t = s.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let mut nonzero = false;
    for c in digits.chars() {
        match c {
            '_' => {}
            c if c.is_ascii_digit() => nonzero |= c != '0',
            _ => return None,
        }
    }
    Some(nonzero)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_int() {
        let cases: &[(&str, Option<bool>)] = &[
            ("0", Some(false)),
            ("1", Some(true)),
            ("2", Some(true)),
            ("-1", Some(true)),
            ("+0", Some(false)),
            (" 1\n", Some(true)),
            ("00", Some(false)),
            ("1_0", Some(true)),
            ("", None),
            ("  ", None),
            ("true", None),
            ("yes", None),
            ("1.0", None),
            ("_1", None),
            ("1__0", None),
            ("0x1", None),
        ];
        for (input, want) in cases {
            assert_eq!(python_int_is_nonzero(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn unset_is_false_and_errors_name_the_variable() {
        let env = VllmEnv::parse(|_| None).unwrap();
        assert_eq!(env, VllmEnv::default());
        let err = VllmEnv::parse(|k| (k == DISABLE_UVA).then(|| "yes".to_string())).unwrap_err();
        assert!(err.to_string().contains(DISABLE_UVA), "{err}");
        assert!(err.to_string().contains("\"yes\""), "{err}");
    }
}
