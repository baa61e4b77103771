//! Restart, in one place. A start reads the journal, adopts the pools (`pools`) and models
//! (`models`) that still match it and the operator's config, verifies adopted models in the
//! background, and removes everything else an earlier run left in `pools.dir` (`adopt`). What
//! came back and what was dropped, with why, is the [`Recovery`] report that GetInfo shows.
//!
//! Writing the journal while the daemon runs is the registries' own business (each records
//! its kind as it changes); this module only reads it back.

mod adopt;
mod models;
mod pools;
mod report;

pub use adopt::{AdoptParams, Adopted, adopt};
pub use report::{JournalOutcome, Recovery, Report};

#[cfg(test)]
mod tests;
