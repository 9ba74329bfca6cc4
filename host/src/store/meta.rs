//! The metadata store: embedded SQLite in the data dir.
//!
//! Records are JSON documents in one table, addressed by `(kind, scope,
//! key)`: a function is `("function", "", name)`, its version 3 is
//! `("version", name, "0000000003")`, an alias `("alias", name, alias)`, and
//! so on (see [`Kind`]). The control plane's model can grow fields without a
//! migration; the schema version lives in `PRAGMA user_version` and
//! [`MetaStore::open`] migrates forward.
//!
//! Durability: WAL with `synchronous=FULL`: a write that returned survives a
//! crash of the process or of the machine. Writes that touch several
//! documents run in one transaction ([`MetaStore::write`]).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Metadata store failures.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// SQLite failed.
    #[error("metadata store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record does not decode (written by a newer kiln?).
    #[error("metadata record {kind}/{scope}/{key} is unreadable: {source}")]
    Decode {
        /// The record's kind.
        kind: &'static str,
        /// Its scope.
        scope: String,
        /// Its key.
        key: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A record could not be encoded.
    #[error("encoding a metadata record: {0}")]
    Encode(serde_json::Error),
    /// Insert of a key that exists.
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

/// The kinds of documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A function's `$LATEST` (scope `""`, key: name).
    Function,
    /// A published function version (scope: function, key: [`version_key`]).
    Version,
    /// An alias (scope: function, key: alias name).
    Alias,
    /// A layer version (scope: layer name, key: [`version_key`]).
    Layer,
    /// A layer's version counter (scope: layer name, key `""`).
    LayerCounter,
    /// A function's resource policy (scope: function, key: qualifier or `""`).
    Policy,
    /// A layer version's policy (scope: layer name, key: [`version_key`]).
    LayerPolicy,
    /// A provisioned concurrency config (scope: function, key: qualifier).
    Provisioned,
    /// An event-invoke config (scope: function, key: qualifier).
    EventInvoke,
    /// An access key (scope `""`, key: access key id).
    AccessKey,
    /// An execution role (scope `""`, key: role name).
    Role,
    /// A function's configuration history (scope: function, key:
    /// [`version_key`] of the change's number).
    History,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Function => "function",
            Kind::Version => "version",
            Kind::Alias => "alias",
            Kind::Layer => "layer",
            Kind::LayerCounter => "layer-counter",
            Kind::Policy => "policy",
            Kind::LayerPolicy => "layer-policy",
            Kind::Provisioned => "provisioned",
            Kind::EventInvoke => "event-invoke",
            Kind::AccessKey => "access-key",
            Kind::Role => "role",
            Kind::History => "history",
        }
    }
}

/// A version number as a key that sorts numerically.
pub fn version_key(n: u64) -> String {
    format!("{n:020}")
}

const MIGRATIONS: &[&str] = &[
    // 1: functions as JSON documents.
    "CREATE TABLE functions (
        name   TEXT PRIMARY KEY NOT NULL,
        record TEXT NOT NULL
    ) STRICT;",
    // 2: every record a document addressed by (kind, scope, key).
    "CREATE TABLE docs (
        kind   TEXT NOT NULL,
        scope  TEXT NOT NULL,
        key    TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (kind, scope, key)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO docs (kind, scope, key, record)
        SELECT 'function', '', name, record FROM functions;
    DROP TABLE functions;",
    // 3: the durable queue of asynchronous invocations and the built-in
    // destination queue (see store::queue).
    "CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id  TEXT NOT NULL,
        function    TEXT NOT NULL,
        qualifier   TEXT,
        payload     BLOB NOT NULL,
        trace_id    TEXT,
        enqueued_ms INTEGER NOT NULL,
        due_ms      INTEGER NOT NULL,
        attempts    INTEGER NOT NULL DEFAULT 0,
        errors      INTEGER NOT NULL DEFAULT 0,
        claimed     INTEGER NOT NULL DEFAULT 0,
        attempt_log TEXT NOT NULL DEFAULT '[]'
    ) STRICT;
    CREATE INDEX events_due ON events (claimed, due_ms);
    CREATE TABLE destination_records (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        function   TEXT NOT NULL,
        condition  TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        record     TEXT NOT NULL
    ) STRICT;
    CREATE INDEX destination_records_function ON destination_records (function, id);",
    // 4: events by function, for a function's pending count (the console).
    "CREATE INDEX events_function ON events (function);",
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
        Self::init(Connection::open(path)?)
    }

    /// Another connection to the same database file, configured alike (for
    /// stores that keep their own connection, such as the queue).
    pub fn connect(path: &Path) -> Result<Connection, MetaError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
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

    /// Reads with a consistent view.
    pub fn read<T, E: From<MetaError>>(
        &self,
        f: impl FnOnce(&Docs<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.transaction(TransactionBehavior::Deferred, f)
    }

    /// Runs `f` in one write transaction: all its changes commit, or none.
    pub fn write<T, E: From<MetaError>>(
        &self,
        f: impl FnOnce(&Docs<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.transaction(TransactionBehavior::Immediate, f)
    }

    fn transaction<T, E: From<MetaError>>(
        &self,
        behavior: TransactionBehavior,
        f: impl FnOnce(&Docs<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(behavior)
            .map_err(MetaError::from)?;
        let out = f(&Docs { conn: &tx })?;
        tx.commit().map_err(MetaError::from)?;
        Ok(out)
    }
}

/// Document operations inside a transaction.
pub struct Docs<'a> {
    conn: &'a Connection,
}

impl Docs<'_> {
    /// Inserts a document; fails with [`MetaError::Exists`] if it exists.
    pub fn insert<T: Serialize>(
        &self,
        kind: Kind,
        scope: &str,
        key: &str,
        record: &T,
    ) -> Result<(), MetaError> {
        let json = serde_json::to_string(record).map_err(MetaError::Encode)?;
        match self.conn.execute(
            "INSERT INTO docs (kind, scope, key, record) VALUES (?1, ?2, ?3, ?4)",
            params![kind.as_str(), scope, key, json],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(MetaError::Exists(format!(
                    "{}/{scope}/{key}",
                    kind.as_str()
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Inserts or replaces a document.
    pub fn put<T: Serialize>(
        &self,
        kind: Kind,
        scope: &str,
        key: &str,
        record: &T,
    ) -> Result<(), MetaError> {
        let json = serde_json::to_string(record).map_err(MetaError::Encode)?;
        self.conn.execute(
            "INSERT INTO docs (kind, scope, key, record) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kind, scope, key) DO UPDATE SET record = excluded.record",
            params![kind.as_str(), scope, key, json],
        )?;
        Ok(())
    }

    /// One document.
    pub fn get<T: DeserializeOwned>(
        &self,
        kind: Kind,
        scope: &str,
        key: &str,
    ) -> Result<Option<T>, MetaError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT record FROM docs WHERE kind = ?1 AND scope = ?2 AND key = ?3",
                params![kind.as_str(), scope, key],
                |r| r.get(0),
            )
            .optional()?;
        json.map(|j| decode(kind, scope, key, &j)).transpose()
    }

    /// Documents of one scope in key order, after `after`, at most `limit`.
    pub fn list<T: DeserializeOwned>(
        &self,
        kind: Kind,
        scope: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, MetaError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, record FROM docs WHERE kind = ?1 AND scope = ?2 AND key > ?3
             ORDER BY key LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![
                kind.as_str(),
                scope,
                after.unwrap_or(""),
                limit.min(i64::MAX as usize) as i64
            ],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (key, json) = row?;
            let value = decode(kind, scope, &key, &json)?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Every document of one kind, over all scopes, in (scope, key) order.
    pub fn all<T: DeserializeOwned>(
        &self,
        kind: Kind,
    ) -> Result<Vec<(String, String, T)>, MetaError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT scope, key, record FROM docs WHERE kind = ?1 ORDER BY scope, key",
        )?;
        let rows = stmt.query_map(params![kind.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (scope, key, json) = row?;
            let value = decode(kind, &scope, &key, &json)?;
            out.push((scope, key, value));
        }
        Ok(out)
    }

    /// The distinct scopes holding documents of `kind`, in order, after
    /// `after`, at most `limit`.
    pub fn scopes(
        &self,
        kind: Kind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, MetaError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT scope FROM docs WHERE kind = ?1 AND scope > ?2 ORDER BY scope LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                kind.as_str(),
                after.unwrap_or(""),
                limit.min(i64::MAX as usize) as i64
            ],
            |r| r.get::<_, String>(0),
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes one document; returns whether it existed.
    pub fn delete(&self, kind: Kind, scope: &str, key: &str) -> Result<bool, MetaError> {
        let n = self.conn.execute(
            "DELETE FROM docs WHERE kind = ?1 AND scope = ?2 AND key = ?3",
            params![kind.as_str(), scope, key],
        )?;
        Ok(n == 1)
    }

    /// Deletes every document of `kind` in `scope`; returns how many.
    pub fn delete_scope(&self, kind: Kind, scope: &str) -> Result<usize, MetaError> {
        Ok(self.conn.execute(
            "DELETE FROM docs WHERE kind = ?1 AND scope = ?2",
            params![kind.as_str(), scope],
        )?)
    }
}

fn decode<T: DeserializeOwned>(
    kind: Kind,
    scope: &str,
    key: &str,
    json: &str,
) -> Result<T, MetaError> {
    serde_json::from_str(json).map_err(|source| MetaError::Decode {
        kind: kind.as_str(),
        scope: scope.to_owned(),
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn documents_crud_and_paging() {
        let s = MetaStore::in_memory().unwrap();
        s.write(|d| {
            for (i, name) in ["b", "a", "c"].iter().enumerate() {
                d.insert(Kind::Function, "", name, &Rec { n: i as u32 })?;
            }
            Ok::<_, MetaError>(())
        })
        .unwrap();
        let dup = s.write(|d| d.insert(Kind::Function, "", "a", &Rec { n: 9 }));
        assert!(matches!(dup, Err(MetaError::Exists(_))));
        let page: Vec<(String, Rec)> = s.read(|d| d.list(Kind::Function, "", None, 2)).unwrap();
        assert_eq!(
            page,
            vec![("a".into(), Rec { n: 1 }), ("b".into(), Rec { n: 0 })]
        );
        let page: Vec<(String, Rec)> = s
            .read(|d| d.list(Kind::Function, "", Some("b"), 2))
            .unwrap();
        assert_eq!(page, vec![("c".into(), Rec { n: 2 })]);
        s.write(|d| d.put(Kind::Function, "", "a", &Rec { n: 7 }))
            .unwrap();
        assert_eq!(
            s.read(|d| d.get::<Rec>(Kind::Function, "", "a")).unwrap(),
            Some(Rec { n: 7 })
        );
        assert!(s.write(|d| d.delete(Kind::Function, "", "a")).unwrap());
        assert!(!s.write(|d| d.delete(Kind::Function, "", "a")).unwrap());
    }

    #[test]
    fn a_failed_write_transaction_changes_nothing() {
        let s = MetaStore::in_memory().unwrap();
        let r: Result<(), MetaError> = s.write(|d| {
            d.insert(Kind::Version, "f", &version_key(1), &Rec { n: 1 })?;
            d.insert(Kind::Version, "f", &version_key(1), &Rec { n: 2 })
        });
        assert!(r.is_err());
        let all: Vec<(String, Rec)> = s.read(|d| d.list(Kind::Version, "f", None, 10)).unwrap();
        assert!(all.is_empty());
    }

    #[test]
    fn version_keys_sort_numerically_and_scopes_list() {
        let s = MetaStore::in_memory().unwrap();
        s.write(|d| {
            for n in [10u64, 9, 100] {
                d.put(Kind::Layer, "lay", &version_key(n), &Rec { n: n as u32 })?;
            }
            d.put(Kind::Layer, "other", &version_key(1), &Rec { n: 1 })
        })
        .unwrap();
        let v: Vec<(String, Rec)> = s.read(|d| d.list(Kind::Layer, "lay", None, 10)).unwrap();
        assert_eq!(
            v.iter().map(|(_, r)| r.n).collect::<Vec<_>>(),
            vec![9, 10, 100]
        );
        assert_eq!(
            s.read(|d| d.scopes(Kind::Layer, None, 10)).unwrap(),
            vec!["lay".to_owned(), "other".to_owned()]
        );
        assert_eq!(s.write(|d| d.delete_scope(Kind::Layer, "lay")).unwrap(), 3);
    }

    #[test]
    fn version_1_databases_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO functions (name, record) VALUES ('f', '{\"n\":5}')",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let s = MetaStore::open(&path).unwrap();
        assert_eq!(
            s.read(|d| d.get::<Rec>(Kind::Function, "", "f")).unwrap(),
            Some(Rec { n: 5 })
        );
    }
}
