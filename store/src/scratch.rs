//! A SQLite store in a directory of its own for unit tests, removed when the test is done.

use chrono::Utc;

use crate::Store;

pub struct Scratch {
    store: Store,
    dir: std::path::PathBuf,
}

impl Scratch {
    pub async fn sqlite(prefix: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(&format!("sqlite:{}/t.db", dir.display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        Scratch { store, dir }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
