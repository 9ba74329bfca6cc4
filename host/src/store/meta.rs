//! The metadata store: embedded SQLite in the data dir.
//!
//! Records are kept as JSON documents keyed by name, so the control plane's
//! model can grow fields without a migration; the schema version lives in
//! `PRAGMA user_version` and [`MetaStore::open`] migrates forward.
//! Durability: WAL with `synchronous=FULL`: a write that returned survives a
//! crash of the process or of the machine.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Metadata store failures.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// SQLite failed.
    #[error("metadata store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record does not decode (written by a newer kiln?).
    #[error("metadata record {name:?} is unreadable: {source}")]
    Decode {
        /// The record's key.
        name: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A record could not be encoded.
    #[error("encoding a metadata record: {0}")]
    Encode(serde_json::Error),
    /// Insert of a name that exists.
    #[error("{0} already exists")]
    Exists(String),
    /// The database is newer than this binary.
    #[error("the metadata store has schema version {found}; this kiln knows up to {known}")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this binary knows.
        known: i64,
    },
}

const MIGRATIONS: &[&str] = &[
    // 1: functions as JSON documents.
    "CREATE TABLE functions (
        name   TEXT PRIMARY KEY NOT NULL,
        record TEXT NOT NULL
    ) STRICT;",
];

/// The metadata store.
pub struct MetaStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore").finish_non_exhaustive()
    }
}

impl MetaStore {
    /// Opens or creates the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> Result<Self, MetaError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, MetaError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(MetaError::TooNew {
                found: version,
                known,
            });
        }
        let tx = conn.transaction()?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        tx.commit()?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // SQLite keeps its own consistency; a panic while holding the lock
        // leaves at worst an open transaction, rolled back on next use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a function record; fails with [`MetaError::Exists`] if the
    /// name is taken.
    pub fn insert_function<T: Serialize>(&self, name: &str, record: &T) -> Result<(), MetaError> {
        let json = serde_json::to_string(record).map_err(MetaError::Encode)?;
        let conn = self.conn();
        match conn.execute(
            "INSERT INTO functions (name, record) VALUES (?1, ?2)",
            params![name, json],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(MetaError::Exists(name.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a function record; returns false if there was none.
    pub fn update_function<T: Serialize>(&self, name: &str, record: &T) -> Result<bool, MetaError> {
        let json = serde_json::to_string(record).map_err(MetaError::Encode)?;
        let n = self.conn().execute(
            "UPDATE functions SET record = ?2 WHERE name = ?1",
            params![name, json],
        )?;
        Ok(n == 1)
    }

    /// One function record.
    pub fn get_function<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, MetaError> {
        let json: Option<String> = self
            .conn()
            .query_row(
                "SELECT record FROM functions WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        json.map(|j| decode(name, &j)).transpose()
    }

    /// Function records in name order, starting after `after`, at most `limit`.
    pub fn list_functions<T: DeserializeOwned>(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<T>, MetaError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, record FROM functions WHERE name > ?1 ORDER BY name LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after.unwrap_or(""), limit as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, json) = row?;
            out.push(decode(&name, &json)?);
        }
        Ok(out)
    }

    /// Deletes a function record; returns false if there was none.
    pub fn delete_function(&self, name: &str) -> Result<bool, MetaError> {
        let n = self
            .conn()
            .execute("DELETE FROM functions WHERE name = ?1", params![name])?;
        Ok(n == 1)
    }
}

fn decode<T: DeserializeOwned>(name: &str, json: &str) -> Result<T, MetaError> {
    serde_json::from_str(json).map_err(|source| MetaError::Decode {
        name: name.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Rec {
        name: String,
        n: u32,
    }

    fn rec(name: &str, n: u32) -> Rec {
        Rec {
            name: name.into(),
            n,
        }
    }

    #[test]
    fn crud_and_paging() {
        let s = MetaStore::in_memory().unwrap();
        for (i, name) in ["b", "a", "c"].iter().enumerate() {
            s.insert_function(name, &rec(name, i as u32)).unwrap();
        }
        assert!(matches!(
            s.insert_function("a", &rec("a", 9)),
            Err(MetaError::Exists(_))
        ));
        let page: Vec<Rec> = s.list_functions(None, 2).unwrap();
        assert_eq!(page, vec![rec("a", 1), rec("b", 0)]);
        let page: Vec<Rec> = s.list_functions(Some("b"), 2).unwrap();
        assert_eq!(page, vec![rec("c", 2)]);
        assert!(s.update_function("a", &rec("a", 7)).unwrap());
        assert!(!s.update_function("zz", &rec("zz", 7)).unwrap());
        assert_eq!(s.get_function::<Rec>("a").unwrap(), Some(rec("a", 7)));
        assert!(s.delete_function("a").unwrap());
        assert!(!s.delete_function("a").unwrap());
        assert_eq!(s.get_function::<Rec>("a").unwrap(), None);
    }

    #[test]
    fn reopening_keeps_records_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let s = MetaStore::open(&path).unwrap();
            s.insert_function("f", &rec("f", 1)).unwrap();
        }
        let s = MetaStore::open(&path).unwrap();
        assert_eq!(s.get_function::<Rec>("f").unwrap(), Some(rec("f", 1)));
    }
}
