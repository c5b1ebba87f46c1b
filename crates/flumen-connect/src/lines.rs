//! JSONL from a file, stdin or memory; JSONL to a file or stdout.

use std::path::Path;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use crate::{AckToken, Committer, ConnectError, FileMode, Message, SinkRecord, Source};

/// One message per non-blank line (a trailing `\r` removed), numbered from 1.
fn lines_of(reader: impl AsyncRead + Unpin + Send + 'static, size: Option<u64>) -> Source {
    let reader = BufReader::with_capacity(1 << 16, reader).split(b'\n');
    let messages = futures::stream::unfold(Some((reader, 0u64)), |state| async move {
        let (mut reader, mut n) = state?;
        loop {
            match reader.next_segment().await {
                Ok(Some(mut raw)) => {
                    n += 1;
                    if raw.last() == Some(&b'\r') {
                        raw.pop();
                    }
                    if raw.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let message = Message {
                        payload: raw,
                        position: format!("line {n}"),
                        partition: 0,
                        key: None,
                        token: AckToken::None,
                    };
                    return Some((Ok(message), Some((reader, n))));
                }
                Ok(None) => return None,
                Err(e) => {
                    let error = ConnectError::Source(format!(
                        "reading after line {n} failed: {e}; the lines before were processed"
                    ));
                    return Some((Err(error), None));
                }
            }
        }
    });
    Source {
        messages: messages.boxed(),
        committer: Committer::none(),
        size,
        stopper: Default::default(),
    }
}

pub(crate) async fn file_source(path: &Path) -> Result<Source, ConnectError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ConnectError::Source(format!("cannot open {}: {e}", path.display())))?;
    let size = file
        .metadata()
        .await
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    Ok(lines_of(file, size))
}

pub(crate) fn stdin_source() -> Source {
    lines_of(tokio::io::stdin(), None)
}

pub(crate) fn bytes_source(bytes: &'static [u8]) -> Source {
    lines_of(bytes, Some(bytes.len() as u64))
}

/// JSONL to a file or stdout; each write is flushed before it returns, and synced to
/// disk with `sync`.
pub(crate) struct LinesSink {
    out: BufWriter<Box<dyn AsyncWrite + Unpin + Send>>,
    name: String,
    /// A second handle on the file, to sync it (none for stdout).
    pub(crate) file: Option<tokio::fs::File>,
    pub(crate) sync: bool,
}

impl LinesSink {
    pub async fn file(path: &Path, mode: FileMode) -> Result<LinesSink, ConnectError> {
        let shown = path.display();
        let fail =
            |what: &str, e: std::io::Error| ConnectError::Sink(format!("{what} {shown}: {e}"));
        let existed = tokio::fs::try_exists(path).await.unwrap_or(true);
        // O_APPEND: every write lands at the end, whatever else has the file open.
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .await
            .map_err(|e| fail("cannot open", e))?;
        // One writer per file: two would interleave or cut each other's lines. The lock
        // is taken before anything is cut, and held while the sink lives.
        let file = file.into_std().await;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ConnectError::Sink(format!(
                    "{shown} is being written by another sink (another flumen process, or \
                     this run's sink, dead-letter sink or quarantine file): give each its own file"
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(fail("cannot lock", e)),
        }
        let mut file = tokio::fs::File::from_std(file);
        match mode {
            FileMode::Truncate => file
                .set_len(0)
                .await
                .map_err(|e| fail("cannot truncate", e))?,
            FileMode::Append => {
                let torn = cut_torn_tail(&mut file)
                    .await
                    .map_err(|e| fail("cannot repair", e))?;
                if torn > 0 {
                    tracing::info!(
                        "{shown}: cut a torn last line ({torn} bytes without a newline, \
                         left by an interrupted write and never acknowledged)"
                    );
                }
            }
        }
        if !existed {
            // The new file's name must survive a power loss too, not only its lines.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let dir = tokio::fs::File::open(dir)
                    .await
                    .map_err(|e| fail("cannot open the folder of", e))?;
                dir.sync_all()
                    .await
                    .map_err(|e| fail("cannot sync the folder of", e))?;
            }
        }
        let handle = file
            .try_clone()
            .await
            .map_err(|e| ConnectError::Sink(format!("cannot open {}: {e}", path.display())))?;
        Ok(LinesSink {
            out: BufWriter::with_capacity(1 << 16, Box::new(file)),
            name: path.display().to_string(),
            file: Some(handle),
            sync: false,
        })
    }

    pub fn stdout() -> LinesSink {
        LinesSink {
            out: BufWriter::with_capacity(1 << 16, Box::new(tokio::io::stdout())),
            name: "stdout".into(),
            file: None,
            sync: false,
        }
    }

    pub async fn write(&mut self, records: Vec<SinkRecord>) -> Result<(), ConnectError> {
        let fail = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::BrokenPipe && self.file.is_none() {
                ConnectError::Closed(self.name.clone())
            } else {
                ConnectError::Sink(format!("writing {}: {e}", self.name))
            }
        };
        for r in records {
            self.out.write_all(&r.payload).await.map_err(fail)?;
            self.out.write_all(b"\n").await.map_err(fail)?;
        }
        self.out.flush().await.map_err(fail)?;
        match &self.file {
            Some(file) if self.sync => file.sync_data().await.map_err(fail),
            _ => Ok(()),
        }
    }
}

/// Cuts a file back to its last newline, and leaves it positioned at its end; returns
/// the bytes cut. Every acknowledged write ends with a newline, so what follows the
/// last one is a write that was interrupted (and never acknowledged).
async fn cut_torn_tail(file: &mut tokio::fs::File) -> std::io::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, SeekFrom};
    let len = file.metadata().await?.len();
    let mut end = len;
    let mut buf = vec![0u8; 1 << 16];
    // Scan backwards, a block at a time, for the last newline.
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start)).await?;
        file.read_exact(&mut buf[..n]).await?;
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if keep < len {
        file.set_len(keep).await?;
    }
    file.seek(SeekFrom::End(0)).await?;
    Ok(len - keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_syncing_file_sink_writes_every_chunk_through() {
        let path = std::env::temp_dir().join(format!("flumen-sync-{}.jsonl", std::process::id()));
        let config = crate::SinkConfig::File {
            path: path.clone(),
            mode: None,
        };
        let sink = crate::Sink::open(&config, "sink", FileMode::Truncate, Default::default())
            .await
            .unwrap();
        let mut sink = sink.syncing(true);
        let record = |p: &str| SinkRecord {
            key: None,
            payload: p.as_bytes().to_vec(),
        };
        sink.write(vec![record("{\"a\":1}"), record("{\"a\":2}")])
            .await
            .unwrap();
        // Durable on return: another reader sees it before the sink is dropped.
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        sink.write(vec![record("{\"a\":3}")]).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        std::fs::remove_file(&path).ok();
        // stdout cannot be synced: the flag is ignored there.
        let stdout = crate::Sink::open(
            &crate::SinkConfig::Stdout,
            "sink",
            FileMode::Truncate,
            Default::default(),
        )
        .await
        .unwrap()
        .syncing(true);
        assert!(matches!(&stdout.inner, crate::SinkKind::Lines(s) if !s.sync));
    }

    #[tokio::test]
    async fn an_appending_sink_keeps_what_is_there_and_cuts_a_torn_last_line() {
        let path = std::env::temp_dir().join(format!("flumen-append-{}.jsonl", std::process::id()));
        let record = |p: &str| SinkRecord {
            key: None,
            payload: p.as_bytes().to_vec(),
        };
        for (before, after) in [
            ("", ""),
            ("{\"a\":1}\n", "{\"a\":1}\n"),
            // A crash in the middle of the second line's write.
            ("{\"a\":1}\n{\"a\":2", "{\"a\":1}\n"),
            // A torn line longer than one block of the backwards scan.
            (
                &format!("{{\"a\":1}}\n{}", "x".repeat(200_000)),
                "{\"a\":1}\n",
            ),
            // No newline at all: all of it is torn.
            ("{\"a\"", ""),
        ] {
            std::fs::write(&path, before).unwrap();
            let mut sink = LinesSink::file(&path, FileMode::Append).await.unwrap();
            sink.write(vec![record("{\"b\":1}")]).await.unwrap();
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                format!("{after}{{\"b\":1}}\n"),
                "{before:.40}"
            );
        }
        // Truncate starts anew.
        let mut sink = LinesSink::file(&path, FileMode::Truncate).await.unwrap();
        sink.write(vec![record("{}")]).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
        // A second writer on the same file is refused, and cuts nothing.
        std::fs::write(&path, "{}\n{\"torn").unwrap();
        let err = LinesSink::file(&path, FileMode::Append)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("another sink"), "{err}");
        let err = LinesSink::file(&path, FileMode::Truncate)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("another sink"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n{\"torn");
        drop(sink);
        assert!(
            LinesSink::file(&path, FileMode::Append).await.is_ok(),
            "free again"
        );
        std::fs::remove_file(&path).ok();
    }

    #[tokio::test]
    async fn lines_are_numbered_blank_ones_skipped_and_crlf_trimmed() {
        let source = bytes_source(b"{\"a\":1}\r\n\n  \n{\"a\":2}\nlast-no-newline");
        let got: Vec<(String, Vec<u8>)> = source
            .messages
            .map(|m| m.map(|m| (m.position, m.payload)).unwrap())
            .collect()
            .await;
        assert_eq!(
            got,
            vec![
                ("line 1".to_string(), b"{\"a\":1}".to_vec()),
                ("line 4".to_string(), b"{\"a\":2}".to_vec()),
                ("line 5".to_string(), b"last-no-newline".to_vec()),
            ]
        );
    }
}
