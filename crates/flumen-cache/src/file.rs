//! The file store: redb, with writes grouped into one durable commit.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use flumen_core::{CacheKey, Store, StoreError, StoreFuture};
use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::oneshot;

use crate::unix_ms;

/// key → (expiry in Unix ms, 0 for never; the value).
const ANSWERS: TableDefinition<&[u8; 32], (u64, &[u8])> = TableDefinition::new("answers");

/// One write waiting for the writer thread's next commit.
struct Write {
    key: CacheKey,
    value: Vec<u8>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Answers in a local file that survives restarts and crashes of this process.
///
/// A write returns once it is durable (committed with fsync): a worker killed after
/// its record's answer was written finds the answer after a restart. Writes that
/// arrive together share one commit (the writer thread takes everything queued),
/// so the fsync is paid per group, not per record. Reads run on tokio's blocking
/// pool. One process at a time: redb locks the file.
pub struct FileStore {
    db: Arc<Database>,
    writes: mpsc::Sender<Write>,
    ttl: Option<Duration>,
    path: PathBuf,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.path)
            .finish()
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("file store: {what}: {e}"))
}

impl FileStore {
    /// Opens (or creates) the store at `path`. Entries expire `ttl` after they were
    /// written, if given: an expired entry is not answered, and is removed when the
    /// store is next opened (so the file does not keep them across restarts).
    pub fn open(path: &Path, ttl: Option<Duration>) -> Result<FileStore, StoreError> {
        let db = Database::create(path).map_err(|e| failed(&path.display().to_string(), e))?;
        {
            let now = unix_ms();
            let tx = db.begin_write().map_err(|e| failed("open", e))?;
            tx.open_table(ANSWERS)
                .map_err(|e| failed("open", e))?
                .retain(|_, (expiry, _)| expiry == 0 || expiry > now)
                .map_err(|e| failed("open", e))?;
            tx.commit().map_err(|e| failed("open", e))?;
        }
        let db = Arc::new(db);
        let (writes, rx) = mpsc::channel();
        let writer = Arc::clone(&db);
        std::thread::Builder::new()
            .name("flumen-file-store".into())
            .spawn(move || write_loop(&writer, &rx))
            .map_err(|e| failed("writer thread", e))?;
        Ok(FileStore {
            db,
            writes,
            ttl,
            path: path.to_owned(),
        })
    }
}

/// Commits every write queued, as one transaction, until the store is dropped.
fn write_loop(db: &Database, rx: &mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        let result = commit(db, &group);
        for w in group {
            let _ = w.done.send(result.clone());
        }
    }
}

fn commit(db: &Database, group: &[Write]) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(|e| failed("write", e))?;
    {
        let mut table = tx.open_table(ANSWERS).map_err(|e| failed("write", e))?;
        for w in group {
            let expiry = u64::from_le_bytes(w.value[..8].try_into().expect("8 bytes"));
            table
                .insert(&w.key, (expiry, &w.value[8..]))
                .map_err(|e| failed("write", e))?;
        }
    }
    tx.commit().map_err(|e| failed("commit", e))
}

impl Store for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Vec<u8>>> {
        let db = Arc::clone(&self.db);
        let key = *key;
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let tx = db.begin_read().map_err(|e| failed("read", e))?;
                let table = tx.open_table(ANSWERS).map_err(|e| failed("read", e))?;
                let Some(entry) = table.get(&key).map_err(|e| failed("read", e))? else {
                    return Ok(None);
                };
                let (expiry, value) = entry.value();
                if expiry != 0 && expiry <= unix_ms() {
                    return Ok(None);
                }
                Ok(Some(value.to_vec()))
            })
            .await
            .map_err(|e| failed("read", e))?
        })
    }

    fn put<'a>(&'a self, key: &'a CacheKey, value: &'a [u8]) -> StoreFuture<'a, ()> {
        let expiry = self
            .ttl
            .map_or(0, |t| unix_ms().saturating_add(t.as_millis() as u64));
        // The expiry travels in front of the value to the writer thread.
        let mut bytes = Vec::with_capacity(8 + value.len());
        bytes.extend_from_slice(&expiry.to_le_bytes());
        bytes.extend_from_slice(value);
        let (done, rx) = oneshot::channel();
        let sent = self.writes.send(Write {
            key: *key,
            value: bytes,
            done,
        });
        Box::pin(async move {
            sent.map_err(|_| StoreError("file store: the writer thread stopped".into()))?;
            rx.await
                .map_err(|_| StoreError("file store: the writer thread stopped".into()))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_survive_reopening_and_expire() {
        let dir = std::env::temp_dir().join(format!("flumen-file-store-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        {
            let store = FileStore::open(&dir, None).unwrap();
            // Sent before any is awaited: the writer thread may commit them together.
            let keys: Vec<CacheKey> = (0..50u8).map(|i| [i; 32]).collect();
            let values: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 10]).collect();
            let puts: Vec<_> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| store.put(k, v))
                .collect();
            for p in puts {
                p.await.unwrap();
            }
            assert_eq!(store.get(&[7; 32]).await.unwrap(), Some(vec![7; 10]));
        }
        // Reopened (the writer thread of the first may still hold the file briefly).
        let mut reopened = None;
        for _ in 0..200 {
            match FileStore::open(&dir, Some(Duration::ZERO)) {
                Ok(s) => {
                    reopened = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let store = reopened.expect("the file reopens once the first store let go");
        assert_eq!(store.get(&[49; 32]).await.unwrap(), Some(vec![49; 10]));
        assert_eq!(store.get(&[50; 32]).await.unwrap(), None);
        // A zero TTL: written already expired.
        store.put(&[1; 32], b"new").await.unwrap();
        assert_eq!(store.get(&[1; 32]).await.unwrap(), None);
        drop(store);
        let _ = std::fs::remove_file(&dir);
    }
}
