//! Alert rules kept in the database: the rules created or changed through the API
//! (`alert_rules`, each overriding a file rule of the same id), and a mirror of the rules
//! file the alerts service runs with (`alert_file_rules`), so that the API can list the
//! merged set from any process.
//!
//! A definition is the rule as JSON text. This crate does not know the rule format: the
//! alerts crate validates a rule before it is written and again when it reads it back.

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::{Result, Store};

/// One rule as stored, with who wrote it last and when.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRule {
    pub id: String,
    /// The rule as JSON text.
    pub definition: String,
    pub updated_at: DateTime<Utc>,
    /// The API principal, or the alerts service for file rules.
    pub updated_by: String,
}

/// The two rule tables; their columns are the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleTable {
    /// Rules created or changed through the API.
    Api,
    /// The mirror of the alerts service's rules file.
    File,
}

impl RuleTable {
    fn name(self) -> &'static str {
        match self {
            RuleTable::Api => "alert_rules",
            RuleTable::File => "alert_file_rules",
        }
    }
}

impl Store {
    /// Every rule of one table, by id.
    pub async fn stored_rules(&self, table: RuleTable) -> Result<Vec<StoredRule>> {
        let sql = format!(
            "SELECT id, definition, updated_at, updated_by FROM {} ORDER BY id",
            table.name()
        );
        on_backend!(self, |pool, ts, get_ts| {
            let rows = sqlx::query(&sql).fetch_all(pool).await?;
            let mut rules = Vec::with_capacity(rows.len());
            for row in &rows {
                rules.push(StoredRule {
                    id: row.try_get("id")?,
                    definition: row.try_get("definition")?,
                    updated_at: get_ts(row, "updated_at")?,
                    updated_by: row.try_get("updated_by")?,
                });
            }
            Ok(rules)
        })
    }

    /// Creates or replaces a rule made through the API; true when it was new.
    pub async fn put_api_rule(&self, rule: &StoredRule) -> Result<bool> {
        on_backend!(self, |pool, ts, get_ts| {
            let mut tx = pool.begin().await?;
            let existed = sqlx::query("SELECT 1 FROM alert_rules WHERE id = $1")
                .bind(&rule.id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            sqlx::query(
                "INSERT INTO alert_rules (id, definition, updated_at, updated_by) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET \
                 definition = excluded.definition, updated_at = excluded.updated_at, \
                 updated_by = excluded.updated_by",
            )
            .bind(&rule.id)
            .bind(&rule.definition)
            .bind(ts(rule.updated_at))
            .bind(&rule.updated_by)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(!existed)
        })
    }

    /// Removes a rule made through the API; false when there was none.
    pub async fn delete_api_rule(&self, id: &str) -> Result<bool> {
        on_backend!(self, |pool, ts, get_ts| {
            let done = sqlx::query("DELETE FROM alert_rules WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    /// Replaces the mirror of the rules file in one transaction, so that a reader never sees
    /// half of the old file and half of the new one.
    pub async fn replace_file_rules(&self, rules: &[StoredRule]) -> Result<()> {
        on_backend!(self, |pool, ts, get_ts| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM alert_file_rules")
                .execute(&mut *tx)
                .await?;
            for rule in rules {
                sqlx::query(
                    "INSERT INTO alert_file_rules (id, definition, updated_at, updated_by) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&rule.id)
                .bind(&rule.definition)
                .bind(ts(rule.updated_at))
                .bind(&rule.updated_by)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sqlite() -> crate::scratch::Scratch {
        crate::scratch::Scratch::sqlite("telemon-rules").await
    }

    /// A fresh database on the test PostgreSQL server (scripts/test.sh starts one).
    async fn postgres() -> Store {
        use sqlx::Connection;

        let admin = std::env::var("TELEMON_TEST_DATABASE_URL")
            .expect("TELEMON_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh");
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        let db = format!("rules_{}", std::process::id());
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

    fn rule(id: &str, definition: &str, by: &str) -> StoredRule {
        // Whole microseconds: what both backends keep.
        let at = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        StoredRule {
            id: id.into(),
            definition: definition.into(),
            updated_at: at,
            updated_by: by.into(),
        }
    }

    async fn check_rules(store: &Store) {
        let first = rule("hr-high", r#"{"v":1}"#, "admin");
        assert!(store.put_api_rule(&first).await.unwrap());
        let second = rule("hr-high", r#"{"v":2}"#, "ann");
        assert!(
            !store.put_api_rule(&second).await.unwrap(),
            "replaced, not new"
        );
        store
            .put_api_rule(&rule("a-rule", "{}", "admin"))
            .await
            .unwrap();
        let api = store.stored_rules(RuleTable::Api).await.unwrap();
        let ids: Vec<&str> = api.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a-rule", "hr-high"], "ordered by id");
        assert_eq!(api[1], second);

        assert!(store.delete_api_rule("hr-high").await.unwrap());
        assert!(!store.delete_api_rule("hr-high").await.unwrap());
        assert_eq!(store.stored_rules(RuleTable::Api).await.unwrap().len(), 1);

        let file = [rule("x", "{}", "alerts"), rule("y", "{}", "alerts")];
        store.replace_file_rules(&file).await.unwrap();
        store.replace_file_rules(&file[1..]).await.unwrap();
        let mirrored = store.stored_rules(RuleTable::File).await.unwrap();
        assert_eq!(mirrored, file[1..].to_vec());
    }

    #[tokio::test]
    async fn api_rules_replace_and_delete_and_the_file_mirror_is_replaced_whole_on_sqlite() {
        check_rules(&*sqlite().await).await;
    }

    #[tokio::test]
    async fn postgres_gives_the_same_answers() {
        check_rules(&postgres().await).await;
    }
}
