//! The worker's counters. They are declared once, in
//! `lb_common::stats::worker_counters!`: the atomics the proxy bumps
//! ([`Counters`]), the struct each worker publishes, and the names, kinds
//! and help texts that the JSON of `lb stats`, its tables and `/metrics`
//! are all built from ([`WorkerCounters::FIELDS`]).

pub use lb_common::stats::{CounterField, CounterKind, WorkerCounters};

/// The live counters of this process.
pub type Counters = lb_common::stats::AtomicWorkerCounters;

/// `counters` as a JSON object, one member per field, in declaration order.
pub fn to_json(counters: &WorkerCounters) -> serde_json::Map<String, serde_json::Value> {
    WorkerCounters::FIELDS.iter().zip(counters.values()).map(|(f, v)| (f.name.to_owned(), v.into())).collect()
}
