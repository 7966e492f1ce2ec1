//! What a first start creates so that the dashboard works at once: an admin user, and with
//! `--simulate`, a patient on a ward for each simulated monitor.

use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;
use rand::distributions::{Alphanumeric, DistString};
use telemon_store::{NewPatient, Store, User};

use crate::data_dir;

/// The dashboard user created on first start.
pub const ADMIN_USER: &str = "admin";
/// The ward simulated patients are on.
pub const SIMULATED_WARD: &str = "ward-1";

pub fn admin_password_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.password")
}

/// Creates the `admin` dashboard user with a random password, written to
/// `<data-dir>/admin.password` (owner-only), unless that user exists already.
pub async fn ensure_admin_user(store: &Store, data_dir: &Path) -> anyhow::Result<()> {
    if store.user(ADMIN_USER).await?.is_some() {
        return Ok(());
    }
    let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 20);
    let path = admin_password_path(data_dir);
    let _ = std::fs::remove_file(&path);
    data_dir::write_private(&path, password.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    let user = User {
        name: ADMIN_USER.to_string(),
        role: "admin".to_string(),
        password_hash: telemon_dashboard_api::auth::hash_password(&password)
            .context("hashing the admin password")?,
    };
    store.create_user(&user, Utc::now()).await?;
    Ok(())
}

/// A patient per simulated monitor (`bed-07` monitors `patient-07`), on one ward, unless the
/// monitor is already attached to someone.
pub async fn register_simulated_patients(store: &Store, devices: &[String]) -> anyhow::Result<()> {
    let attached = store.patient_directory().await?.devices;
    for device in devices.iter().filter(|d| !attached.contains_key(*d)) {
        let number = device.trim_start_matches("bed-");
        let patient = NewPatient {
            id: format!("patient-{number}"),
            name: format!("Simulated patient {number}"),
            ward: Some(SIMULATED_WARD.to_string()),
            spo2_scale: 1,
        };
        store.upsert_patient(&patient).await?;
        store.attach_device(device, &patient.id).await?;
    }
    Ok(())
}
