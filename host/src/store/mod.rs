//! Durable state: the metadata store (SQLite), the queue of asynchronous
//! invocations (same database), the artifact store (code archives on
//! disk) and the sealed store that keeps them encrypted.

pub mod artifacts;
pub mod meta;
pub mod queue;
pub mod sealed;
