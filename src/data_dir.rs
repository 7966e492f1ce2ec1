//! The data directory: where `telemon up` keeps everything it creates.
//!
//! ```text
//! <data-dir>/certs/          CA, CRL, broker certificate, index of issued certificates
//! <data-dir>/devices/        certificates of simulated devices
//! <data-dir>/admin.token     bearer token for the HTTP API (mode 0600)
//! <data-dir>/telemon.db      embedded SQLite store (when no database URL is given)
//! <data-dir>/spool/          readings waiting for the database
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::RngCore;
use telemon_store::Store;

/// Creates the data directory readable by its owner only: it holds patient data, password
/// hashes and keys. An existing directory is tightened the same way.
pub fn create(data_dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {} to its owner", data_dir.display()))?;
    }
    Ok(())
}

pub fn certs(data_dir: &Path) -> PathBuf {
    data_dir.join("certs")
}

pub fn devices(data_dir: &Path) -> PathBuf {
    data_dir.join("devices")
}

pub fn spool(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}

pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// Reads the admin token, creating a random one on first start.
pub fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = admin_token_path(data_dir);
    if let Ok(token) = fs::read_to_string(&path) {
        let token = token.trim().to_string();
        if token.len() >= 32 {
            return Ok(token);
        }
        anyhow::bail!(
            "{} holds a token shorter than 32 characters",
            path.display()
        );
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_private(&path, token.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Opens the store (PostgreSQL when a URL is given, else SQLite in the data dir) and brings
/// its schema up to date.
pub async fn open_store(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<Store> {
    let url = match database_url {
        Some(url) => url.to_string(),
        None => {
            create(data_dir)?;
            format!("sqlite:{}", data_dir.join("telemon.db").display())
        }
    };
    // The URL may carry a password: name only the backend in errors.
    let store = Store::connect(&url)
        .await
        .context("opening the store (check --database-url / DATABASE_URL)")?;
    store.migrate().await.context("migrating the store")?;
    Ok(store)
}
