//! The durable queue of asynchronous invocations, and the built-in
//! destination queue where records of finished events are kept.
//!
//! All writes go through one writer thread that owns a SQLite connection
//! and commits commands in batches: many enqueues (or claims, or
//! completions) share one transaction and so one fsync (group commit).
//! A command's reply is sent only after its batch committed, so an
//! acknowledged enqueue is on disk (WAL, `synchronous=FULL`).
//!
//! An event's life: enqueued (due now) -> claimed by the dispatcher
//! (`claimed=1`, `attempts+1`, the start time logged) -> completed: deleted,
//! with any destination record or follow-up event written in the same
//! transaction; or put back with a later due time. A server that dies
//! leaves claimed events behind; [`QueueStore::open`] releases them, so
//! they run again (delivery is at least once).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, oneshot};

use super::meta::{MetaError, MetaStore};

/// Queue failures.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// SQLite failed.
    #[error("queue store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Opening the database failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The writer thread is gone (the server is shutting down).
    #[error("the queue is shutting down")]
    Closed,
    /// No such record.
    #[error("no record {0}")]
    NoRecord(i64),
    /// The batch a command was in did not commit.
    #[error("queue commit failed: {0}")]
    Commit(String),
    /// The writer thread could not start.
    #[error("starting the queue writer: {0}")]
    Thread(std::io::Error),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An event to enqueue.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The invocation's request id, kept across retries.
    pub request_id: String,
    /// Function name.
    pub function: String,
    /// Qualifier, if the caller gave one.
    pub qualifier: Option<String>,
    /// The event payload.
    pub payload: Vec<u8>,
    /// Trace id.
    pub trace_id: Option<String>,
}

/// A claimed event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Row id.
    pub id: i64,
    /// Request id.
    pub request_id: String,
    /// Function name.
    pub function: String,
    /// Qualifier.
    pub qualifier: Option<String>,
    /// Payload.
    pub payload: Vec<u8>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// When it was enqueued.
    pub enqueued_ms: i64,
    /// Invocations started, this one included.
    pub attempts: u32,
    /// Function errors so far.
    pub errors: u32,
    /// Start times of attempts (ms since the epoch, with microseconds),
    /// this one included.
    pub attempt_log: Vec<f64>,
}

/// A record for the built-in destination queue.
#[derive(Debug, Clone)]
pub struct DestinationRecord {
    /// The function whose event it records.
    pub function: String,
    /// `Success`, `RetriesExhausted`, `EventAgeExceeded`, ...
    pub condition: String,
    /// The event's request id.
    pub request_id: String,
    /// Lambda's invocation record.
    pub record: serde_json::Value,
}

/// A record as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredRecord {
    /// Id, for `show` and `redrive`.
    pub id: i64,
    /// Source function.
    pub function: String,
    /// Condition.
    pub condition: String,
    /// Request id.
    pub request_id: String,
    /// When it was written.
    pub created_ms: i64,
    /// The invocation record.
    pub record: serde_json::Value,
}

/// How a claimed event ends (for now).
#[derive(Debug, Clone)]
pub enum Completion {
    /// Done: delete it, keep `record` in the built-in queue and enqueue
    /// `follow_up` (a delivery to a destination function), atomically.
    Finish {
        /// For the built-in queue.
        record: Option<Box<DestinationRecord>>,
        /// For a destination function.
        follow_up: Option<Box<NewEvent>>,
    },
    /// Try again at `due_ms`; `function_error` counts toward the retry limit.
    Retry {
        /// When.
        due_ms: i64,
        /// Whether this attempt was a function error.
        function_error: bool,
    },
}

enum Command {
    Enqueue(NewEvent, oneshot::Sender<Result<i64, QueueError>>),
    Claim(i64, usize, oneshot::Sender<Result<Vec<Event>, QueueError>>),
    Complete(i64, Completion, oneshot::Sender<Result<(), QueueError>>),
    Redrive(
        String,
        Option<Vec<i64>>,
        oneshot::Sender<Result<usize, QueueError>>,
    ),
}

/// Most commands one transaction commits.
const BATCH: usize = 512;

/// The queue of one data dir.
pub struct QueueStore {
    commands: Mutex<mpsc::Sender<Command>>,
    reader: Mutex<Connection>,
    /// Signalled after a batch made events due.
    pub ready: Arc<Notify>,
    path: PathBuf,
}

impl std::fmt::Debug for QueueStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl QueueStore {
    /// Opens the queue in the database at `path` (migrated by
    /// [`MetaStore::open`]), releases events a dead server had claimed, and
    /// starts the writer thread.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        let writer = MetaStore::connect(path)?;
        let released = writer.execute("UPDATE events SET claimed = 0 WHERE claimed = 1", [])?;
        if released > 0 {
            tracing::info!(
                events = released,
                "events in flight when the server stopped will run again"
            );
        }
        let reader = MetaStore::connect(path)?;
        let ready = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel();
        let notify = ready.clone();
        std::thread::Builder::new()
            .name("kiln-queue".into())
            .spawn(move || writer_loop(writer, rx, notify))
            .map_err(QueueError::Thread)?;
        Ok(Self {
            commands: Mutex::new(tx),
            reader: Mutex::new(reader),
            ready,
            path: path.to_path_buf(),
        })
    }

    fn send(&self, c: Command) -> Result<(), QueueError> {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(c)
            .map_err(|_| QueueError::Closed)
    }

    /// Stores an event durably; returns its id once it is on disk.
    pub async fn enqueue(&self, event: NewEvent) -> Result<i64, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Enqueue(event, tx))?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Claims up to `limit` due events.
    pub async fn claim(&self, limit: usize) -> Result<Vec<Event>, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Claim(now_ms(), limit, tx))?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Records how a claimed event ended.
    pub async fn complete(&self, id: i64, completion: Completion) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Complete(id, completion, tx))?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Moves records of `function` from the built-in queue back into the
    /// event queue as new events (all, or those with the given ids).
    pub async fn redrive(
        &self,
        function: &str,
        ids: Option<Vec<i64>>,
    ) -> Result<usize, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Redrive(function.to_owned(), ids, tx))?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, QueueError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    /// When the next unclaimed event is due, if any.
    pub fn next_due(&self) -> Result<Option<i64>, QueueError> {
        self.read(|c| {
            c.query_row(
                "SELECT MIN(due_ms) FROM events WHERE claimed = 0",
                [],
                |r| r.get(0),
            )
        })
    }

    /// Events waiting or running.
    pub fn depth(&self) -> Result<u64, QueueError> {
        self.read(|c| c.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
    }

    /// Events of `function` waiting or running.
    pub fn depth_of(&self, function: &str) -> Result<u64, QueueError> {
        self.read(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM events WHERE function = ?1",
                [function],
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|n| n as u64)
    }

    /// Records of `function` in the built-in queue, oldest first, after
    /// `after`, at most `limit`.
    pub fn records(
        &self,
        function: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, QueueError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, function, condition, request_id, created_ms, record
                 FROM destination_records WHERE function = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![function, after, limit as i64], row_to_record)?;
            rows.collect()
        })
    }

    /// One record.
    pub fn record(&self, function: &str, id: i64) -> Result<StoredRecord, QueueError> {
        self.read(|c| {
            c.query_row(
                "SELECT id, function, condition, request_id, created_ms, record
                 FROM destination_records WHERE function = ?1 AND id = ?2",
                params![function, id],
                row_to_record,
            )
            .optional()
        })?
        .ok_or(QueueError::NoRecord(id))
    }
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRecord> {
    let json: String = r.get(5)?;
    Ok(StoredRecord {
        id: r.get(0)?,
        function: r.get(1)?,
        condition: r.get(2)?,
        request_id: r.get(3)?,
        created_ms: r.get(4)?,
        record: serde_json::from_str(&json).unwrap_or(serde_json::Value::Null),
    })
}

enum Reply {
    Enqueue(
        oneshot::Sender<Result<i64, QueueError>>,
        Result<i64, QueueError>,
    ),
    Claim(
        oneshot::Sender<Result<Vec<Event>, QueueError>>,
        Result<Vec<Event>, QueueError>,
    ),
    Complete(
        oneshot::Sender<Result<(), QueueError>>,
        Result<(), QueueError>,
    ),
    Redrive(
        oneshot::Sender<Result<usize, QueueError>>,
        Result<usize, QueueError>,
    ),
}

impl Reply {
    fn send(self, commit: &Result<(), String>) {
        let fail = |e: &String| QueueError::Commit(e.clone());
        match self {
            Reply::Enqueue(tx, r) => {
                let _ = tx.send(commit.as_ref().map_err(fail).and(r));
            }
            Reply::Claim(tx, r) => {
                let _ = tx.send(commit.as_ref().map_err(fail).and(r));
            }
            Reply::Complete(tx, r) => {
                let _ = tx.send(commit.as_ref().map_err(fail).and(r));
            }
            Reply::Redrive(tx, r) => {
                let _ = tx.send(commit.as_ref().map_err(fail).and(r));
            }
        }
    }
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Command>, ready: Arc<Notify>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut made_due = false;
        let commit = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for command in batch {
                match command {
                    Command::Enqueue(e, reply) => {
                        made_due = true;
                        replies.push(Reply::Enqueue(
                            reply,
                            insert_event(&tx, &e, now_ms()).map_err(Into::into),
                        ));
                    }
                    Command::Claim(now, limit, reply) => {
                        replies.push(Reply::Claim(
                            reply,
                            claim(&tx, now, limit).map_err(Into::into),
                        ));
                    }
                    Command::Complete(id, completion, reply) => {
                        made_due = true;
                        replies.push(Reply::Complete(
                            reply,
                            complete(&tx, id, completion).map_err(Into::into),
                        ));
                    }
                    Command::Redrive(function, ids, reply) => {
                        made_due = true;
                        replies.push(Reply::Redrive(
                            reply,
                            redrive(&tx, &function, ids.as_deref()),
                        ));
                    }
                }
            }
            tx.commit()
        })()
        .map_err(|e| e.to_string());
        if let Err(e) = &commit {
            tracing::error!(error = %e, "queue commit failed");
        }
        for reply in replies {
            reply.send(&commit);
        }
        if made_due {
            ready.notify_one();
        }
    }
}

fn insert_event(c: &Connection, e: &NewEvent, now: i64) -> rusqlite::Result<i64> {
    c.prepare_cached(
        "INSERT INTO events (request_id, function, qualifier, payload, trace_id, enqueued_ms, due_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )?
    .execute(params![e.request_id, e.function, e.qualifier, e.payload, e.trace_id, now])?;
    Ok(c.last_insert_rowid())
}

fn claim(c: &Connection, now: i64, limit: usize) -> rusqlite::Result<Vec<Event>> {
    let mut stmt = c.prepare_cached(
        "UPDATE events
         SET claimed = 1, attempts = attempts + 1, attempt_log = json_insert(attempt_log, '$[#]', ?3)
         WHERE id IN (SELECT id FROM events WHERE claimed = 0 AND due_ms <= ?1 ORDER BY due_ms, id LIMIT ?2)
         RETURNING id, request_id, function, qualifier, payload, trace_id, enqueued_ms, attempts, errors, attempt_log",
    )?;
    let now_precise = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_micros() as f64) / 1000.0);
    let rows = stmt.query_map(params![now, limit as i64, now_precise], |r| {
        let log: String = r.get(9)?;
        Ok(Event {
            id: r.get(0)?,
            request_id: r.get(1)?,
            function: r.get(2)?,
            qualifier: r.get(3)?,
            payload: r.get(4)?,
            trace_id: r.get(5)?,
            enqueued_ms: r.get(6)?,
            attempts: r.get::<_, i64>(7)? as u32,
            errors: r.get::<_, i64>(8)? as u32,
            attempt_log: serde_json::from_str(&log).unwrap_or_default(),
        })
    })?;
    let mut events: Vec<Event> = rows.collect::<Result<_, _>>()?;
    events.sort_by_key(|e| e.id);
    Ok(events)
}

fn complete(c: &Connection, id: i64, completion: Completion) -> rusqlite::Result<()> {
    match completion {
        Completion::Finish { record, follow_up } => {
            c.prepare_cached("DELETE FROM events WHERE id = ?1")?
                .execute(params![id])?;
            if let Some(r) = record {
                c.prepare_cached(
                    "INSERT INTO destination_records (function, condition, request_id, created_ms, record)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![r.function, r.condition, r.request_id, now_ms(), r.record.to_string()])?;
            }
            if let Some(e) = follow_up {
                insert_event(c, &e, now_ms())?;
            }
        }
        Completion::Retry {
            due_ms,
            function_error,
        } => {
            c.prepare_cached(
                "UPDATE events SET claimed = 0, due_ms = ?2, errors = errors + ?3 WHERE id = ?1",
            )?
            .execute(params![id, due_ms, i64::from(function_error)])?;
        }
    }
    Ok(())
}

fn redrive(c: &Connection, function: &str, ids: Option<&[i64]>) -> Result<usize, QueueError> {
    let records: Vec<(i64, String, String)> = {
        let mut stmt = c.prepare_cached(
            "SELECT id, request_id, record FROM destination_records WHERE function = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![function], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut n = 0;
    for (id, request_id, record) in records {
        if ids.is_some_and(|ids| !ids.contains(&id)) {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(&record).unwrap_or_default();
        let qualifier = record["requestContext"]["functionArn"]
            .as_str()
            .and_then(|arn| arn.rsplit_once(":function:"))
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(_, q)| q.to_owned())
            .filter(|q| q != "$LATEST");
        let payload = serde_json::to_vec(&record["requestPayload"]).unwrap_or_default();
        insert_event(
            c,
            &NewEvent {
                request_id,
                function: function.to_owned(),
                qualifier,
                payload,
                trace_id: None,
            },
            now_ms(),
        )?;
        c.prepare_cached("DELETE FROM destination_records WHERE id = ?1")?
            .execute(params![id])?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, QueueStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        MetaStore::open(&path).unwrap();
        let q = QueueStore::open(&path).unwrap();
        (dir, q)
    }

    fn event(n: u32) -> NewEvent {
        NewEvent {
            request_id: format!("r{n}"),
            function: "f".into(),
            qualifier: None,
            payload: format!("{{\"n\":{n}}}").into_bytes(),
            trace_id: None,
        }
    }

    #[tokio::test]
    async fn enqueue_claim_retry_finish() {
        let (_d, q) = open();
        let a = q.enqueue(event(1)).await.unwrap();
        q.enqueue(event(2)).await.unwrap();
        assert_eq!(q.depth().unwrap(), 2);
        let claimed = q.claim(10).await.unwrap();
        assert_eq!(claimed.len(), 2);
        assert_eq!(claimed[0].attempts, 1);
        assert_eq!(claimed[0].attempt_log.len(), 1);
        assert!(
            q.claim(10).await.unwrap().is_empty(),
            "claimed events are not claimed twice"
        );
        q.complete(
            a,
            Completion::Retry {
                due_ms: 0,
                function_error: true,
            },
        )
        .await
        .unwrap();
        let again = q.claim(10).await.unwrap();
        assert_eq!((again[0].id, again[0].attempts, again[0].errors), (a, 2, 1));
        q.complete(
            a,
            Completion::Finish {
                record: Some(Box::new(DestinationRecord {
                    function: "f".into(),
                    condition: "RetriesExhausted".into(),
                    request_id: "r1".into(),
                    record: serde_json::json!({"requestPayload": {"n": 1}, "requestContext": {"functionArn": "arn:aws:lambda:us-east-1:000000000000:function:f:7"}}),
                })),
                follow_up: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(q.depth().unwrap(), 1);
        let records = q.records("f", 0, 10).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            q.record("f", records[0].id).unwrap().condition,
            "RetriesExhausted"
        );
        assert_eq!(q.redrive("f", None).await.unwrap(), 1);
        assert!(q.records("f", 0, 10).unwrap().is_empty());
        let redriven = q.claim(10).await.unwrap();
        assert_eq!(redriven.len(), 1);
        assert_eq!(redriven[0].payload, br#"{"n":1}"#);
        assert_eq!(redriven[0].qualifier.as_deref(), Some("7"));
        assert_eq!(redriven[0].attempts, 1, "a redriven event starts over");
    }

    #[tokio::test]
    async fn claimed_events_are_released_when_the_queue_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        MetaStore::open(&path).unwrap();
        {
            let q = QueueStore::open(&path).unwrap();
            q.enqueue(event(1)).await.unwrap();
            assert_eq!(q.claim(10).await.unwrap().len(), 1);
        }
        let q = QueueStore::open(&path).unwrap();
        let again = q.claim(10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempts, 2, "the interrupted attempt counts");
    }

    #[tokio::test]
    async fn many_enqueues_commit_in_batches() {
        let (_d, q) = open();
        let q = Arc::new(q);
        let mut tasks = Vec::new();
        for n in 0..200 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move { q.enqueue(event(n)).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(q.depth().unwrap(), 200);
    }
}
