//! The local spool: batches acknowledged to the broker while the database is unreachable.
//!
//! One file per batch, written to a temporary name, synced and renamed, so that a crash
//! leaves either a whole batch or none. Files are replayed in order once the database is
//! back, and removed only after their rows are committed. The spool is bounded: when full,
//! ingest stops acknowledging, and the broker keeps the messages instead.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use telemon_model::Reading;
use telemon_store::DeadLetter;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("spool is full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
}

/// One spooled batch.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SpooledBatch {
    pub readings: Vec<Reading>,
    pub dead_letters: Vec<SpooledDeadLetter>,
}

/// A dead letter as spooled; payload bytes kept exactly.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpooledDeadLetter {
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub topic: String,
    pub identity: Option<String>,
    pub reason: String,
    pub detail: String,
    pub payload: Vec<u8>,
}

impl From<&DeadLetter> for SpooledDeadLetter {
    fn from(d: &DeadLetter) -> Self {
        SpooledDeadLetter {
            received_at: d.received_at,
            topic: d.topic.clone(),
            identity: d.identity.clone(),
            reason: d.reason.clone(),
            detail: d.detail.clone(),
            payload: d.payload.clone(),
        }
    }
}

impl From<SpooledDeadLetter> for DeadLetter {
    fn from(d: SpooledDeadLetter) -> Self {
        DeadLetter {
            received_at: d.received_at,
            topic: d.topic,
            identity: d.identity,
            reason: d.reason,
            detail: d.detail,
            payload: d.payload,
        }
    }
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    used: u64,
    next_seq: u64,
}

impl Spool {
    /// Opens (creating) the spool directory and accounts for batches left by a previous run.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            used: 0,
            next_seq: 0,
        };
        for (seq, path) in spool.files()? {
            spool.used += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            spool.next_seq = spool.next_seq.max(seq + 1);
        }
        Ok(spool)
    }

    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0 && self.files().map(|f| f.is_empty()).unwrap_or(true)
    }

    /// Writes a batch durably; when this returns Ok the batch survives a crash.
    pub fn append(&mut self, batch: &SpooledBatch) -> Result<(), SpoolError> {
        let bytes = serde_json::to_vec(batch).map_err(|source| SpoolError::Corrupt {
            path: self.dir.clone(),
            source,
        })?;
        if self.used + bytes.len() as u64 > self.max_bytes {
            return Err(SpoolError::Full {
                used: self.used,
                max: self.max_bytes,
            });
        }
        let name = format!("{:020}.batch", self.next_seq);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(name);
        let io = |source| SpoolError::Io {
            path: tmp.clone(),
            source,
        };
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(dir) = fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        self.next_seq += 1;
        self.used += bytes.len() as u64;
        Ok(())
    }

    /// The oldest spooled batch and its file, if any.
    pub fn oldest(&self) -> Result<Option<(PathBuf, SpooledBatch)>, SpoolError> {
        let Some((_, path)) = self.files()?.into_iter().next() else {
            return Ok(None);
        };
        let bytes = fs::read(&path).map_err(|source| SpoolError::Io {
            path: path.clone(),
            source,
        })?;
        let batch = serde_json::from_slice(&bytes).map_err(|source| SpoolError::Corrupt {
            path: path.clone(),
            source,
        })?;
        Ok(Some((path, batch)))
    }

    /// Removes a batch once its rows are committed.
    pub fn remove(&mut self, path: &Path) -> Result<(), SpoolError> {
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(path).map_err(|source| SpoolError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.used = self.used.saturating_sub(len);
        Ok(())
    }

    fn files(&self) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| SpoolError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut files: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let path = e.path();
                let seq = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".batch")?
                    .parse()
                    .ok()?;
                Some((seq, path))
            })
            .collect();
        files.sort();
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use telemon_model::{DeviceId, Value};

    fn reading(v: f64) -> Reading {
        Reading {
            device_id: DeviceId::new("bed-1").unwrap(),
            metric: "heart_rate".into(),
            time: Utc::now(),
            value: Value::Number(v),
            unit: None,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("telemon-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn batches_come_back_in_order_and_survive_reopening() {
        let dir = temp_dir("order");
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        for v in [1.0, 2.0] {
            let batch = SpooledBatch {
                readings: vec![reading(v)],
                ..Default::default()
            };
            spool.append(&batch).unwrap();
        }

        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        assert!(spool.used_bytes() > 0);
        let (path, first) = spool.oldest().unwrap().unwrap();
        assert_eq!(first.readings[0].value, Value::Number(1.0));
        spool.remove(&path).unwrap();
        let (path, second) = spool.oldest().unwrap().unwrap();
        assert_eq!(second.readings[0].value, Value::Number(2.0));
        spool.remove(&path).unwrap();
        assert!(spool.oldest().unwrap().is_none());
        assert_eq!(spool.used_bytes(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_batches_past_its_bound() {
        let dir = temp_dir("full");
        let mut spool = Spool::open(&dir, 64).unwrap();
        let batch = SpooledBatch {
            readings: vec![reading(1.0)],
            ..Default::default()
        };
        assert!(matches!(spool.append(&batch), Err(SpoolError::Full { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
