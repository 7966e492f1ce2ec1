//! Access-control storage: users and their sessions, API tokens, patients, which devices
//! monitor which patient, which principal is assigned which patients, and the audit log.
//!
//! The queries are written once with `$n` placeholders, which both backends accept; only
//! the time columns differ (timestamptz on PostgreSQL, epoch microseconds on SQLite), so each
//! method's body is expanded once per backend by [`on_backend!`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use crate::{Result, Store};

/// A user as stored: the role is checked by the database to be admin, clinician or viewer.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    pub role: String,
    pub password_hash: String,
}

/// A named token, for an integration (with a role) or for one device.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiToken {
    pub name: String,
    pub role: String,
    /// Set for a device token: it reads that device's data only.
    pub device: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewPatient {
    pub id: String,
    pub name: String,
    pub ward: Option<String>,
    /// 1, or 2 for patients with a prescribed 88-92 % SpO2 target.
    pub spo2_scale: i16,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Patient {
    pub id: String,
    pub name: String,
    pub ward: Option<String>,
    pub spo2_scale: i16,
    /// The devices monitoring the patient now.
    pub devices: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
}

/// What the alert engine needs to know: device -> patient, and each patient's ward and SpO2
/// scale.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PatientDirectory {
    pub devices: BTreeMap<String, String>,
    /// Patient id -> (ward, SpO2 scale).
    pub patients: BTreeMap<String, (Option<String>, i16)>,
}

impl Store {
    /// Creates a user; false when the name is taken.
    pub async fn create_user(&self, user: &User, now: DateTime<Utc>) -> Result<bool> {
        on_backend!(self, |pool, ts, get_ts| {
            let done = sqlx::query(
                "INSERT INTO users (name, role, password_hash, created_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
            )
            .bind(&user.name)
            .bind(&user.role)
            .bind(&user.password_hash)
            .bind(ts(now))
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    pub async fn user(&self, name: &str) -> Result<Option<User>> {
        on_backend!(self, |pool, ts, get_ts| {
            let row = sqlx::query("SELECT name, role, password_hash FROM users WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?;
            Ok(row.map(|r| user_from(r.get(0), r.get(1), r.get(2))))
        })
    }

    /// Every user's name and role, by name.
    pub async fn users(&self) -> Result<Vec<(String, String)>> {
        on_backend!(self, |pool, ts, get_ts| {
            let rows = sqlx::query("SELECT name, role FROM users ORDER BY name")
                .fetch_all(pool)
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    pub async fn create_session(
        &self,
        token_hash: &str,
        user: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        on_backend!(self, |pool, ts, get_ts| {
            sqlx::query(
                "INSERT INTO sessions (token_hash, user_name, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(token_hash)
            .bind(user)
            .bind(ts(now))
            .bind(ts(expires_at))
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// The user of an unexpired session.
    pub async fn session_user(&self, token_hash: &str, now: DateTime<Utc>) -> Result<Option<User>> {
        on_backend!(self, |pool, ts, get_ts| {
            let row = sqlx::query(
                "SELECT u.name, u.role, u.password_hash FROM sessions s \
                 JOIN users u ON u.name = s.user_name \
                 WHERE s.token_hash = $1 AND s.expires_at > $2",
            )
            .bind(token_hash)
            .bind(ts(now))
            .fetch_optional(pool)
            .await?;
            Ok(row.map(|r| user_from(r.get(0), r.get(1), r.get(2))))
        })
    }

    /// Ends a session (logout); ending one that does not exist is not an error.
    pub async fn delete_session(&self, token_hash: &str) -> Result<()> {
        on_backend!(self, |pool, ts, get_ts| {
            sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
                .bind(token_hash)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// Removes expired sessions; returns how many.
    pub async fn delete_expired_sessions(&self, now: DateTime<Utc>) -> Result<u64> {
        on_backend!(self, |pool, ts, get_ts| {
            let done = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
                .bind(ts(now))
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
    }

    /// Creates a named API token; false when the name is taken.
    pub async fn create_api_token(
        &self,
        token: &ApiToken,
        token_hash: &str,
        created_by: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        on_backend!(self, |pool, ts, get_ts| {
            let done = sqlx::query(
                "INSERT INTO api_tokens (name, token_hash, role, device_id, created_by, \
                 created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
            )
            .bind(&token.name)
            .bind(token_hash)
            .bind(&token.role)
            .bind(&token.device)
            .bind(created_by)
            .bind(ts(now))
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    pub async fn api_token(&self, token_hash: &str) -> Result<Option<ApiToken>> {
        on_backend!(self, |pool, ts, get_ts| {
            let row =
                sqlx::query("SELECT name, role, device_id FROM api_tokens WHERE token_hash = $1")
                    .bind(token_hash)
                    .fetch_optional(pool)
                    .await?;
            Ok(row.map(|r| ApiToken {
                name: r.get(0),
                role: r.get(1),
                device: r.get(2),
            }))
        })
    }

    /// Creates or updates a patient (its devices are left as they are).
    pub async fn upsert_patient(&self, patient: &NewPatient) -> Result<()> {
        on_backend!(self, |pool, ts, get_ts| {
            sqlx::query(
                "INSERT INTO patients (id, name, ward, spo2_scale) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, ward = excluded.ward, \
                 spo2_scale = excluded.spo2_scale",
            )
            .bind(&patient.id)
            .bind(&patient.name)
            .bind(&patient.ward)
            .bind(patient.spo2_scale)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Every patient with their devices, by id.
    pub async fn patients(&self) -> Result<Vec<Patient>> {
        let (patients, devices) = on_backend!(self, |pool, ts, get_ts| {
            let patients = sqlx::query("SELECT id, name, ward, spo2_scale FROM patients")
                .fetch_all(pool)
                .await?;
            let patients: Vec<(String, String, Option<String>, i16)> = patients
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            let devices = sqlx::query("SELECT device_id, patient_id FROM patient_devices")
                .fetch_all(pool)
                .await?;
            let devices: Vec<(String, String)> =
                devices.iter().map(|r| (r.get(0), r.get(1))).collect();
            (patients, devices)
        });
        Ok(assemble_patients(patients, devices))
    }

    /// Attaches a device to a patient, moving it from any patient it monitored before.
    pub async fn attach_device(&self, device: &str, patient: &str) -> Result<()> {
        on_backend!(self, |pool, ts, get_ts| {
            sqlx::query(
                "INSERT INTO patient_devices (device_id, patient_id) VALUES ($1, $2) \
                 ON CONFLICT (device_id) DO UPDATE SET patient_id = excluded.patient_id",
            )
            .bind(device)
            .bind(patient)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Detaches a device from its patient; false when it was not attached.
    pub async fn detach_device(&self, device: &str) -> Result<bool> {
        on_backend!(self, |pool, ts, get_ts| {
            let done = sqlx::query("DELETE FROM patient_devices WHERE device_id = $1")
                .bind(device)
                .execute(pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Assigns a patient to a principal (a user name or an integration token name).
    pub async fn assign(&self, principal: &str, patient: &str) -> Result<()> {
        on_backend!(self, |pool, ts, get_ts| {
            sqlx::query(
                "INSERT INTO assignments (principal, patient_id) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(principal)
            .bind(patient)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Ends an assignment; false when there was none.
    pub async fn unassign(&self, principal: &str, patient: &str) -> Result<bool> {
        on_backend!(self, |pool, ts, get_ts| {
            let done =
                sqlx::query("DELETE FROM assignments WHERE principal = $1 AND patient_id = $2")
                    .bind(principal)
                    .bind(patient)
                    .execute(pool)
                    .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// The patients assigned to a principal, with the devices monitoring them.
    pub async fn assigned_patients(&self, principal: &str) -> Result<Vec<(String, Vec<String>)>> {
        let rows: Vec<(String, Option<String>)> = on_backend!(self, |pool, ts, get_ts| {
            let rows = sqlx::query(
                "SELECT a.patient_id, d.device_id FROM assignments a \
                 LEFT JOIN patient_devices d ON d.patient_id = a.patient_id \
                 WHERE a.principal = $1 ORDER BY a.patient_id",
            )
            .bind(principal)
            .fetch_all(pool)
            .await?;
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        });
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (patient, device) in rows {
            if out.last().is_none_or(|(p, _)| *p != patient) {
                out.push((patient, Vec::new()));
            }
            if let (Some(device), Some((_, devices))) = (device, out.last_mut()) {
                devices.push(device);
            }
        }
        Ok(out)
    }

    pub async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        on_backend!(self, |pool, ts, get_ts| {
            sqlx::query(
                "INSERT INTO audit_log (at, actor, action, target) VALUES ($1, $2, $3, $4)",
            )
            .bind(ts(entry.at))
            .bind(&entry.actor)
            .bind(&entry.action)
            .bind(&entry.target)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// The newest audit entries first, optionally of one actor.
    pub async fn audit(&self, actor: Option<&str>, limit: i64) -> Result<Vec<AuditEntry>> {
        on_backend!(self, |pool, ts, get_ts| {
            let rows = sqlx::query(
                "SELECT at, actor, action, target FROM audit_log \
                 WHERE ($1 IS NULL OR actor = $1) ORDER BY id DESC LIMIT $2",
            )
            .bind(actor)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(AuditEntry {
                        at: get_ts(r, "at")?,
                        actor: r.try_get("actor")?,
                        action: r.try_get("action")?,
                        target: r.try_get("target")?,
                    })
                })
                .collect()
        })
    }

    /// The alert engine's directory as the patient tables say it now.
    pub async fn patient_directory(&self) -> Result<PatientDirectory> {
        let mut directory = PatientDirectory::default();
        for p in self.patients().await? {
            for device in &p.devices {
                directory.devices.insert(device.clone(), p.id.clone());
            }
            directory.patients.insert(p.id, (p.ward, p.spo2_scale));
        }
        Ok(directory)
    }
}

fn user_from(name: String, role: String, password_hash: String) -> User {
    User {
        name,
        role,
        password_hash,
    }
}

fn assemble_patients(
    patients: Vec<(String, String, Option<String>, i16)>,
    devices: Vec<(String, String)>,
) -> Vec<Patient> {
    let mut by_id: BTreeMap<String, Patient> = patients
        .into_iter()
        .map(|(id, name, ward, spo2_scale)| {
            let patient = Patient {
                id: id.clone(),
                name,
                ward,
                spo2_scale,
                devices: Vec::new(),
            };
            (id, patient)
        })
        .collect();
    for (device, patient) in devices {
        if let Some(p) = by_id.get_mut(&patient) {
            p.devices.push(device);
        }
    }
    for p in by_id.values_mut() {
        p.devices.sort();
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh database on the test PostgreSQL server (scripts/test.sh starts one).
    async fn postgres_store(name: &str) -> Store {
        use sqlx::Connection;

        let admin = std::env::var("TELEMON_TEST_DATABASE_URL")
            .expect("TELEMON_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh");
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        let db = format!("access_{name}_{}", std::process::id());
        for sql in [
            format!("DROP DATABASE IF EXISTS {db}"),
            format!("CREATE DATABASE {db}"),
        ] {
            sqlx::query(&sql).execute(&mut conn).await.unwrap();
        }
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        let store = Store::connect(&format!("{base}/{db}")).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    #[tokio::test]
    async fn postgres_gives_the_same_answers() {
        let store = postgres_store("same").await;
        check_sessions(&store).await;
        check_assignments(&store).await;
        check_audit(&store).await;
    }

    async fn store() -> crate::scratch::Scratch {
        crate::scratch::Scratch::sqlite("telemon-access").await
    }

    fn patient(id: &str) -> NewPatient {
        NewPatient {
            id: id.into(),
            name: format!("Patient {id}"),
            ward: Some("ward-a".into()),
            spo2_scale: 2,
        }
    }

    #[tokio::test]
    async fn sessions_expire() {
        check_sessions(&*store().await).await;
    }

    async fn check_sessions(store: &Store) {
        let now = Utc::now();
        let user = User {
            name: "ann".into(),
            role: "clinician".into(),
            password_hash: "h".into(),
        };
        assert!(store.create_user(&user, now).await.unwrap());
        assert!(!store.create_user(&user, now).await.unwrap());
        let later = now + chrono::Duration::hours(1);
        store.create_session("t1", "ann", now, later).await.unwrap();

        let seen = store.session_user("t1", now).await.unwrap();
        assert_eq!(seen.map(|u| u.name), Some("ann".to_string()));
        assert_eq!(store.session_user("t1", later).await.unwrap(), None);
        assert_eq!(store.delete_expired_sessions(later).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn assignments_follow_devices_and_feed_the_directory() {
        check_assignments(&*store().await).await;
    }

    async fn check_assignments(store: &Store) {
        store.upsert_patient(&patient("p1")).await.unwrap();
        store.upsert_patient(&patient("p2")).await.unwrap();
        store.attach_device("bed-1", "p1").await.unwrap();
        store.attach_device("bed-2", "p1").await.unwrap();
        store.attach_device("bed-2", "p2").await.unwrap();
        store.assign("ann", "p1").await.unwrap();
        store.assign("ann", "p1").await.unwrap();

        let assigned = store.assigned_patients("ann").await.unwrap();
        assert_eq!(
            assigned,
            vec![("p1".to_string(), vec!["bed-1".to_string()])]
        );
        let directory = store.patient_directory().await.unwrap();
        assert_eq!(
            directory.devices.get("bed-2").map(String::as_str),
            Some("p2")
        );
        assert_eq!(
            directory.patients.get("p1"),
            Some(&(Some("ward-a".into()), 2))
        );
        assert!(store.unassign("ann", "p1").await.unwrap());
        assert!(store.assigned_patients("ann").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn audit_lists_newest_first_per_actor() {
        check_audit(&*store().await).await;
    }

    async fn check_audit(store: &Store) {
        for (actor, target) in [("ann", "p1"), ("bob", "p2"), ("ann", "p3")] {
            let entry = AuditEntry {
                at: Utc::now(),
                actor: actor.into(),
                action: "view patient".into(),
                target: target.into(),
            };
            store.record_audit(&entry).await.unwrap();
        }
        let ann = store.audit(Some("ann"), 10).await.unwrap();
        assert_eq!(
            ann.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
            vec!["p3", "p1"]
        );
        assert_eq!(store.audit(None, 10).await.unwrap().len(), 3);
    }
}
