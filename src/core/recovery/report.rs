//! What this start recovered from the journal and what it dropped, with why: GetInfo shows it,
//! so an operator learns why a model is missing without reading the log.

use std::sync::Mutex;

/// How the journal was found at start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum JournalOutcome {
    /// No journal: a first start, or the last run kept nothing.
    #[default]
    Absent,
    /// Read and applied; what matched was adopted.
    Applied,
    /// Unreadable (corrupt, truncated, another version): everything it described was removed.
    Discarded(String),
}

/// A pool or model the journal described that did not come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub journal: JournalOutcome,
    pub pools_adopted: Vec<String>,
    pub models_adopted: Vec<String>,
    pub dropped: Vec<Dropped>,
}

/// The report, filled at start and by verifications that finish later.
#[derive(Debug, Default)]
pub struct Recovery(Mutex<Report>);

impl Recovery {
    pub fn snapshot(&self) -> Report {
        self.lock().clone()
    }

    pub fn set_journal(&self, outcome: JournalOutcome) {
        self.lock().journal = outcome;
    }

    pub fn pool_adopted(&self, name: &str) {
        self.lock().pools_adopted.push(name.to_string());
    }

    pub fn model_adopted(&self, name: &str) {
        self.lock().models_adopted.push(name.to_string());
    }

    /// Records and logs a drop.
    pub fn dropped(&self, kind: &'static str, name: &str, reason: String) {
        tracing::warn!(kind, name, %reason, "dropped from the journal");
        let mut r = self.lock();
        r.models_adopted.retain(|m| !(kind == "model" && m == name));
        r.dropped.push(Dropped {
            kind,
            name: name.to_string(),
            reason,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Report> {
        self.0.lock().expect("recovery lock")
    }
}
