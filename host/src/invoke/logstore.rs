//! Function logs at rest: one log stream per execution environment (named
//! as `AWS_LAMBDA_LOG_STREAM_NAME` says) under `<data>/logs/<function>/`,
//! each line a JSON event with its time. A stream is a series of segments:
//! the active one (`<stream>.log`) takes appends and, once it holds a
//! segment's worth, is sealed under the next number (`<stream>.<n>.log`).
//! A writer task appends (invocations only queue their lines), and enforces
//! retention segment by segment: segments older than the age limit go, and
//! a function's oldest segments go while it holds more than its byte limit,
//! so that a busy stream loses its oldest lines, never its newest.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How long and how much is kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Streams not written for this long are removed.
    pub max_age: Duration,
    /// Most bytes kept per function; the oldest streams go first.
    pub max_bytes_per_function: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes_per_function: 64 << 20,
        }
    }
}

/// One log line as stored and as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEvent {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log_stream_name: String,
    pub message: String,
}

/// What a reader asks for.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// Events at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only events whose message contains this text.
    pub filter: Option<String>,
    /// Most events returned: the latest ones.
    pub limit: usize,
    /// Only the lines of this invocation (START to REPORT), whatever
    /// `filter` says.
    pub request_id: Option<String>,
    /// Only this stream.
    pub stream: Option<String>,
}

struct Batch {
    function: String,
    stream: String,
    events: Vec<LogEvent>,
}

enum Message {
    Append(Batch),
    /// Answered once everything queued before it is written: a reader
    /// sees every invocation that finished before it asked.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The store: a queue to the writer task, and the directory readers read.
#[derive(Debug, Clone)]
pub struct LogStore {
    dir: PathBuf,
    tx: mpsc::Sender<Message>,
}

/// Batches queued before an invocation waits for the writer.
const QUEUE: usize = 1024;

/// A stream name as a file name: `/` cannot be in one.
fn file_name(stream: &str) -> String {
    let mut name: String = stream
        .chars()
        .map(|c| if c == '/' || c == '\0' { '-' } else { c })
        .collect();
    name.push_str(".log");
    name
}

/// The stream a segment file belongs to, and its place in the stream
/// (sealed segments by number, the active one last).
fn segment_of(file: &str) -> Option<(String, u64)> {
    let base = file.strip_suffix(".log")?;
    let (base, seq) = match base.rsplit_once('.') {
        Some((b, n)) if n.len() == SEQ_DIGITS && n.bytes().all(|c| c.is_ascii_digit()) => {
            (b, n.parse().ok()?)
        }
        _ => (base, u64::MAX),
    };
    Some((stream_name(&format!("{base}.log"))?, seq))
}

/// Digits of a sealed segment's number.
const SEQ_DIGITS: usize = 6;

/// A sealed segment's file name.
fn sealed_name(stream: &str, seq: u64) -> String {
    let active = file_name(stream);
    let base = active.strip_suffix(".log").unwrap_or(&active);
    format!("{base}.{seq:0width$}.log", width = SEQ_DIGITS)
}

/// How large an active segment grows before it is sealed: an eighth of a
/// function's limit, so that retention removes at most that much at once.
fn segment_bytes(retention: Retention) -> u64 {
    (retention.max_bytes_per_function / 8).clamp(16 << 10, 8 << 20)
}

fn stream_name(file: &str) -> Option<String> {
    let base = file.strip_suffix(".log")?;
    // `2024-05-01-[$LATEST]id` back to `2024/05/01/[$LATEST]id`.
    let mut parts = base.splitn(4, '-');
    let (y, m, d, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some(format!("{y}/{m}/{d}/{rest}"))
}

impl LogStore {
    /// Opens `dir` and starts the writer, which also applies `retention`.
    /// Must be called within the server's runtime.
    pub fn open(dir: PathBuf, retention: Retention) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_dir = dir.clone();
        std::thread::Builder::new()
            .name("kiln-logs".into())
            .spawn(move || write_loop(&writer_dir, rx, retention))?;
        Ok(Self { dir, tx })
    }

    /// Queues one invocation's log text for `function`'s `stream`.
    pub async fn append(&self, function: &str, stream: &str, text: &[u8]) {
        let timestamp = crate::store::queue::now_ms();
        let events: Vec<LogEvent> = String::from_utf8_lossy(text)
            .lines()
            .map(|line| LogEvent {
                timestamp,
                log_stream_name: String::new(),
                message: line.to_owned(),
            })
            .collect();
        if events.is_empty() {
            return;
        }
        let batch = Batch {
            function: function.to_owned(),
            stream: stream.to_owned(),
            events,
        };
        // Waits when the writer is behind rather than dropping lines.
        if self.tx.send(Message::Append(batch)).await.is_err() {
            tracing::error!(function, "the log writer has stopped; log lines lost");
        }
    }

    /// Reads `function`'s events matching `query`, oldest first, once the
    /// lines already queued are written.
    pub async fn read(&self, function: &str, query: LogQuery) -> io::Result<Vec<LogEvent>> {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.tx.send(Message::Barrier(done)).await.is_ok() {
            let _ = written.await;
        }
        let dir = self.dir.join(function);
        tokio::task::spawn_blocking(move || read_function(&dir, &query))
            .await
            .map_err(io::Error::other)?
    }
}

fn read_function(dir: &Path, query: &LogQuery) -> io::Result<Vec<LogEvent>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut events = Vec::new();
    // A stream's segments in order, so that lines of one millisecond keep
    // their order through the stable sort below.
    let mut files: Vec<(String, u64, fs::DirEntry)> = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some((stream, seq)) = segment_of(&file) {
            files.push((stream, seq, entry));
        }
    }
    files.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut invocation = None;
    let mut current_stream = None;
    for (stream, _, entry) in files {
        if query.stream.as_ref().is_some_and(|s| *s != stream) {
            continue;
        }
        // A stream last written before `since` has nothing to give: a
        // follower's polls read only the streams still being written.
        if let Some(since) = query.since_ms
            && entry
                .metadata()?
                .modified()?
                .duration_since(SystemTime::UNIX_EPOCH)
                .is_ok_and(|m| (m.as_millis() as i64) < since)
        {
            continue;
        }
        let reader = match fs::File::open(entry.path()) {
            Ok(f) => io::BufReader::new(f),
            // Sealed or removed since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // One invocation's lines may span two segments of its stream.
        if current_stream.as_ref() != Some(&stream) {
            current_stream = Some(stream.clone());
            invocation = query.request_id.as_deref().map(Invocation::new);
        }
        for line in reader.lines() {
            let Ok(mut event) = serde_json::from_str::<LogEvent>(&line?) else {
                continue;
            };
            if query.since_ms.is_some_and(|s| event.timestamp < s) {
                continue;
            }
            if let Some(inv) = invocation.as_mut() {
                if inv.takes(&event.message) {
                    event.log_stream_name = stream.clone();
                    events.push(event);
                }
                continue;
            }
            if query
                .filter
                .as_deref()
                .is_some_and(|f| !event.message.contains(f))
            {
                continue;
            }
            event.log_stream_name = stream.clone();
            events.push(event);
        }
    }
    // Stable: lines of one stream keep their order within a millisecond.
    events.sort_by_key(|e| e.timestamp);
    let skip = events.len().saturating_sub(query.limit.max(1));
    Ok(events.split_off(skip))
}

/// Picks one invocation's lines out of a stream. An environment runs one
/// invocation at a time and its log is appended in one piece, so the lines
/// from its START (text) or `platform.start` (JSON) record through its
/// REPORT are its own. Without those records (JSON with `SystemLogLevel`
/// WARN), the lines naming its request id are.
struct Invocation {
    start_text: String,
    report_text: String,
    json_id: String,
    inside: bool,
}

impl Invocation {
    fn new(request_id: &str) -> Self {
        Self {
            start_text: format!("START RequestId: {request_id} "),
            report_text: format!("REPORT RequestId: {request_id}\t"),
            json_id: format!("\"requestId\":\"{request_id}\""),
            inside: false,
        }
    }

    fn takes(&mut self, message: &str) -> bool {
        let json = message.starts_with('{');
        let names_it = json && message.contains(&self.json_id);
        if !self.inside {
            let starts = message.starts_with(&self.start_text)
                || (names_it && message.contains("\"type\":\"platform.start\""));
            if starts {
                self.inside = true;
                return true;
            }
            return names_it;
        }
        if message.starts_with(&self.report_text)
            || (names_it && message.contains("\"type\":\"platform.report\""))
        {
            self.inside = false;
        }
        true
    }
}

fn write_loop(dir: &Path, mut rx: mpsc::Receiver<Message>, retention: Retention) {
    let mut last_sweep = SystemTime::now();
    let mut written: BTreeMap<String, u64> = BTreeMap::new();
    let segment = segment_bytes(retention);
    while let Some(message) = rx.blocking_recv() {
        let batch = match message {
            Message::Append(batch) => batch,
            Message::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let function_dir = dir.join(&batch.function);
        let mut text = Vec::new();
        for event in &batch.events {
            if serde_json::to_writer(&mut text, event).is_ok() {
                text.push(b'\n');
            }
        }
        let active = function_dir.join(file_name(&batch.stream));
        let appended = fs::create_dir_all(&function_dir).and_then(|()| {
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&active)?;
            file.write_all(&text)?;
            file.metadata()
        });
        match appended {
            Ok(meta) if meta.len() >= segment => {
                if let Err(e) = seal(&function_dir, &batch.stream) {
                    tracing::error!(function = %batch.function, error = %e, "sealing a log segment");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(function = %batch.function, error = %e, "writing function logs");
            }
        }
        let since_sweep = written.entry(batch.function.clone()).or_default();
        *since_sweep += text.len() as u64;
        // Sweep a function once it may have passed its limit, and every
        // function once a minute for age.
        if *since_sweep > retention.max_bytes_per_function / 8 {
            *since_sweep = 0;
            sweep(&function_dir, retention);
        }
        if last_sweep.elapsed().unwrap_or_default() > Duration::from_secs(60) {
            last_sweep = SystemTime::now();
            if let Ok(entries) = fs::read_dir(dir) {
                for entry in entries.flatten() {
                    sweep(&entry.path(), retention);
                }
            }
        }
    }
}

/// Seals a stream's active segment under the next free number.
fn seal(function_dir: &Path, stream: &str) -> io::Result<()> {
    let next = fs::read_dir(function_dir)?
        .flatten()
        .filter_map(|e| segment_of(&e.file_name().to_string_lossy()))
        .filter(|(s, seq)| s == stream && *seq != u64::MAX)
        .map(|(_, seq)| seq + 1)
        .max()
        .unwrap_or(1);
    fs::rename(
        function_dir.join(file_name(stream)),
        function_dir.join(sealed_name(stream, next)),
    )
}

/// Applies retention to one function's segments, oldest first.
fn sweep(function_dir: &Path, retention: Retention) {
    let Ok(entries) = fs::read_dir(function_dir) else {
        return;
    };
    let now = SystemTime::now();
    // Oldest first: by the time a segment was last written, then (for
    // segments of one stream written within the clock's resolution) by
    // their order in the stream.
    let mut segments: Vec<(SystemTime, String, u64, u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let (stream, seq) = segment_of(&e.file_name().to_string_lossy())?;
            Some((meta.modified().ok()?, stream, seq, meta.len(), e.path()))
        })
        .collect();
    segments.sort();
    let mut total: u64 = segments.iter().map(|(_, _, _, len, _)| len).sum();
    for (modified, _, _, len, path) in segments {
        let too_old = now.duration_since(modified).unwrap_or_default() > retention.max_age;
        if too_old || total > retention.max_bytes_per_function {
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        } else {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_survive_the_file_system() {
        let stream = "2026/11/23/[$LATEST]0123abcd";
        assert_eq!(file_name(stream), "2026-11-23-[$LATEST]0123abcd.log");
        assert_eq!(stream_name(&file_name(stream)).unwrap(), stream);
    }

    fn write(dir: &Path, stream: &str, events: &[(i64, &str)]) {
        fs::create_dir_all(dir).unwrap();
        let mut f = fs::File::create(dir.join(file_name(stream))).unwrap();
        for (t, m) in events {
            let e = LogEvent {
                timestamp: *t,
                log_stream_name: String::new(),
                message: (*m).to_owned(),
            };
            writeln!(f, "{}", serde_json::to_string(&e).unwrap()).unwrap();
        }
    }

    #[test]
    fn reads_merge_streams_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        write(
            &f,
            "2026/11/23/[$LATEST]a",
            &[(1, "START a"), (5, "hello a")],
        );
        write(&f, "2026/11/23/[1]b", &[(3, "START b"), (4, "hello b")]);
        let all = read_function(
            &f,
            &LogQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .unwrap();
        let messages: Vec<_> = all.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["START a", "START b", "hello b", "hello a"]);
        assert_eq!(all[1].log_stream_name, "2026/11/23/[1]b");
        let some = read_function(
            &f,
            &LogQuery {
                since_ms: Some(4),
                filter: Some("hello".into()),
                limit: 100,
                request_id: None,
                stream: None,
            },
        )
        .unwrap();
        assert_eq!(some.len(), 2);
        let last = read_function(
            &f,
            &LogQuery {
                limit: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(last[0].message, "hello a");
        assert!(
            read_function(&dir.path().join("none"), &LogQuery::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn retention_removes_the_oldest_streams_first() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        write(&f, "2026/11/23/[$LATEST]old", &[(1, &"x".repeat(1000))]);
        // Modification times must differ for the order to be defined.
        let old = f.join(file_name("2026/11/23/[$LATEST]old"));
        let past = SystemTime::now() - Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(past)
            .unwrap();
        write(&f, "2026/11/23/[$LATEST]new", &[(2, &"y".repeat(1000))]);
        sweep(
            &f,
            Retention {
                max_age: Duration::from_secs(86400),
                max_bytes_per_function: 1500,
            },
        );
        assert!(!old.exists());
        assert!(f.join(file_name("2026/11/23/[$LATEST]new")).exists());
        sweep(
            &f,
            Retention {
                max_age: Duration::from_millis(0),
                max_bytes_per_function: u64::MAX,
            },
        );
        assert_eq!(fs::read_dir(&f).unwrap().count(), 0);
    }

    #[test]
    fn segments_keep_a_stream_and_its_order() {
        let stream = "2026/11/23/[$LATEST]0123abcd";
        assert_eq!(
            segment_of(&file_name(stream)),
            Some((stream.to_owned(), u64::MAX))
        );
        assert_eq!(
            sealed_name(stream, 7),
            "2026-11-23-[$LATEST]0123abcd.000007.log"
        );
        assert_eq!(
            segment_of(&sealed_name(stream, 7)),
            Some((stream.to_owned(), 7))
        );
        assert_eq!(segment_of("notes.txt"), None);
    }

    #[test]
    fn a_busy_stream_loses_its_oldest_lines_not_its_newest() {
        // One stream written far past the limit: retention keeps its
        // newest segments (about the limit's worth), never the whole stream
        // gone or only a sliver of it.
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_age: Duration::from_secs(86400),
            max_bytes_per_function: 256 << 10,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt
            .block_on(async { LogStore::open(dir.path().to_path_buf(), retention) })
            .unwrap();
        let stream = "2026/11/23/[$LATEST]busy";
        let line = "x".repeat(1000);
        rt.block_on(async {
            for i in 0..1000 {
                store
                    .append("f", stream, format!("{i:04} {line}").as_bytes())
                    .await;
            }
        });
        let events = rt
            .block_on(store.read(
                "f",
                LogQuery {
                    limit: 10_000,
                    ..Default::default()
                },
            ))
            .unwrap();
        let kept: u64 = fs::read_dir(dir.path().join("f"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(kept <= retention.max_bytes_per_function, "{kept}");
        assert!(kept >= retention.max_bytes_per_function / 2, "{kept}");
        assert!(events.last().unwrap().message.starts_with("0999 "));
        // The lines kept are the newest, in order.
        let numbers: Vec<u32> = events
            .iter()
            .map(|e| e.message[..4].parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert!(numbers[0] > 0 && events.len() > 100, "{}", events.len());
    }

    #[test]
    fn one_invocations_lines_are_picked_out_of_its_stream() {
        let lines = [
            "START RequestId: a Version: 1",
            "a's output",
            "END RequestId: a",
            "REPORT RequestId: a\tDuration: 1.00 ms",
            "START RequestId: b Version: 1",
            "b's output",
            "END RequestId: b",
            "REPORT RequestId: b\tDuration: 1.00 ms",
            r#"{"time":"t","type":"platform.start","record":{"requestId":"c","version":"1"}}"#,
            r#"{"timestamp":"t","level":"INFO","requestId":"c","message":"c's output"}"#,
            r#"{"time":"t","type":"platform.report","record":{"requestId":"c"}}"#,
            r#"{"timestamp":"t","level":"WARN","requestId":"d","message":"d alone"}"#,
        ];
        let pick = |id: &str| {
            let mut inv = Invocation::new(id);
            lines
                .iter()
                .filter(|l| inv.takes(l))
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(pick("b"), &lines[4..8]);
        assert_eq!(pick("c"), &lines[8..11]);
        assert_eq!(pick("d"), &lines[11..]);
        assert!(pick("e").is_empty());
    }
}
