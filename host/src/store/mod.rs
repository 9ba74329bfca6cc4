//! Durable state: the metadata store (SQLite), the queue of asynchronous
//! invocations (same database), and the artifact store (code archives on
//! disk).

pub mod artifacts;
pub mod meta;
pub mod queue;
