//! Durable state: the metadata store (SQLite) and the artifact store (code
//! archives on disk).

pub mod artifacts;
pub mod meta;
