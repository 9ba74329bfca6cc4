//! Progress of the CLI's long operations (large uploads, waits for
//! provisioned concurrency; builds show cargo's own), drawn on stderr only when it is a terminal:
//! scripts and `--output json` see nothing but their result.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};

/// Bodies at least this large are uploaded with a progress bar.
pub const LARGE_UPLOAD: usize = 1 << 20;
/// How much of an upload is handed to the connection at a time.
const CHUNK: usize = 64 * 1024;

/// A bar over `total` steps, with `unit` after the counts (`ready`).
pub fn counter(total: u64, message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new(total).with_message(message.into());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A request body that advances a byte bar as the connection takes it.
pub struct Upload {
    data: Bytes,
    bar: ProgressBar,
}

impl Upload {
    /// `data`, with a bar labelled `message`.
    pub fn new(data: Vec<u8>, message: &str) -> Self {
        let bar = ProgressBar::new(data.len() as u64).with_message(message.to_owned());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {percent}% ({bytes_per_sec})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Self {
            data: Bytes::from(data),
            bar,
        }
    }
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.data.is_empty() {
            self.bar.finish();
            return Poll::Ready(None);
        }
        let n = self.data.len().min(CHUNK);
        let chunk = self.data.split_to(n);
        self.bar.inc(n as u64);
        // The connection need not poll again once the body says it ended.
        if self.data.is_empty() {
            self.bar.finish();
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn an_upload_yields_its_bytes_in_chunks() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let body = Upload::new(data.clone(), "uploading");
        let bar = body.bar.clone();
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected.as_ref(), data.as_slice());
        assert_eq!(bar.position(), 200_000);
    }
}
