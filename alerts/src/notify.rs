//! Webhook notifications: every alert transition at or above a webhook's minimum priority is
//! POSTed to it as the [`AlertEvent`] JSON, signed when the webhook has a secret.
//!
//! Each webhook has its own worker task and bounded queue, so a slow or dead receiver delays
//! only its own deliveries, never alert evaluation and never the other webhooks. Deliveries
//! to one webhook are made in order: a receiver never sees `resolved` before `firing`.
//!
//! # Signature
//!
//! `X-Telemon-Signature: sha256=<hex>` is the HMAC-SHA256 of the exact request body under the
//! webhook's secret, as GitHub signs its webhooks. A receiver recomputes it over the raw body
//! and compares in constant time.
//!
//! # Known shortcomings
//!
//! - Deliveries waiting in a queue or between retries are lost when the process stops.
//! - While one transition is being retried, later ones to the same webhook wait behind it
//!   (up to about 40 s with the default policy); a full queue drops new deliveries, counted
//!   as `dropped`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use sha2::Sha256;
use telemon_model::metrics::{self, Counter};
use telemon_model::{AlertEvent, Priority};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "X-Telemon-Signature";

/// Deliveries waiting per webhook. A receiver down for the whole retry period of one
/// delivery falls behind by at most this many transitions before new ones are dropped.
const QUEUE: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The URL is not shown in full: webhook URLs often carry a token.
    #[error("webhook #{index}: invalid URL (expected http:// or https://)")]
    InvalidUrl { index: usize },
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// One webhook, as written in the configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    /// Key of the body signature; no signature header when absent.
    #[serde(default)]
    pub secret: Option<String>,
    /// Transitions of alerts below this priority are not sent. Low by default: everything.
    #[serde(default = "lowest_priority")]
    pub min_priority: Priority,
}

fn lowest_priority() -> Priority {
    Priority::Low
}

// Hand-written so that neither the secret nor a token in the URL reaches a log line.
impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("host", &host_of(&self.url))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("min_priority", &self.min_priority)
            .finish()
    }
}

fn host_of(url: &str) -> String {
    Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

/// How hard a delivery is tried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Tries per delivery, the first included.
    pub attempts: u32,
    /// Wait before the second try; it doubles before each further one (1 s, 2 s, 4 s, ...).
    pub first_backoff: Duration,
    /// Whole-request timeout: a receiver that accepts the connection and never answers must
    /// not hold its queue for longer.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, body), the value of [`SIGNATURE_HEADER`].
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length, so this never fails; the fallback keeps it panic-free.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Hands alert transitions to the webhook workers. Cheap to clone; never waits.
#[derive(Clone, Default)]
pub struct Notifier {
    targets: Arc<[Target]>,
}

struct Target {
    min_priority: Priority,
    queue: mpsc::Sender<Arc<[u8]>>,
    dropped: Counter,
}

/// What became of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Delivered,
    /// Every try failed, or the receiver refused the request for good (a 4xx).
    Failed,
}

struct Counters {
    delivered: Counter,
    failed: Counter,
    retries: Counter,
}

impl Counters {
    fn new() -> Self {
        Counters {
            delivered: delivery_counter("delivered"),
            failed: delivery_counter("failed"),
            retries: metrics::counter(
                "telemon_alerts_webhook_retries_total",
                "Webhook requests tried again after a failure.",
                &[],
            ),
        }
    }
}

fn delivery_counter(result: &str) -> Counter {
    metrics::counter(
        "telemon_alerts_webhook_deliveries_total",
        "Alert transitions sent to webhooks, by result (delivered, failed, dropped).",
        &[("result", result)],
    )
}

impl Notifier {
    /// Checks every webhook and starts one worker task per webhook. Must be called inside a
    /// tokio runtime.
    pub fn start(webhooks: Vec<Webhook>, policy: RetryPolicy) -> Result<Notifier, NotifyError> {
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .user_agent(concat!("telemon-alerts/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut targets = Vec::with_capacity(webhooks.len());
        for (index, webhook) in webhooks.into_iter().enumerate() {
            let url = Url::parse(&webhook.url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or(NotifyError::InvalidUrl { index })?;

            let (queue, rx) = mpsc::channel(QUEUE);
            let worker = Worker {
                client: client.clone(),
                host: url.host_str().unwrap_or_default().to_string(),
                url,
                secret: webhook.secret.map(String::into_bytes),
                policy,
                counters: Counters::new(),
            };
            tokio::spawn(worker.run(rx));
            targets.push(Target {
                min_priority: webhook.min_priority,
                queue,
                dropped: delivery_counter("dropped"),
            });
        }
        Ok(Notifier {
            targets: targets.into(),
        })
    }

    /// Queues the transition for every webhook that wants its priority.
    pub fn notify(&self, event: &AlertEvent) {
        let wanted = |t: &&Target| event.priority >= t.min_priority;
        if !self.targets.iter().any(|t| wanted(&t)) {
            return;
        }
        let body: Arc<[u8]> = match serde_json::to_vec(event) {
            Ok(body) => body.into(),
            Err(e) => return warn!(alert = %event.id, cause = %e, "alert not serializable"),
        };
        for target in self.targets.iter().filter(wanted) {
            if target.queue.try_send(body.clone()).is_err() {
                target.dropped.inc();
                warn!(alert = %event.id, "webhook queue full; transition not sent");
            }
        }
    }
}

/// Delivers to one webhook, one transition at a time, in order.
struct Worker {
    client: reqwest::Client,
    url: Url,
    /// For logs: the URL's path and query may hold a token.
    host: String,
    secret: Option<Vec<u8>>,
    policy: RetryPolicy,
    counters: Counters,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Arc<[u8]>>) {
        while let Some(body) = rx.recv().await {
            match self.deliver(&body).await {
                Outcome::Delivered => self.counters.delivered.inc(),
                Outcome::Failed => {
                    self.counters.failed.inc();
                    warn!(webhook = %self.host, "webhook delivery failed; transition not sent");
                }
            }
        }
    }

    async fn deliver(&self, body: &[u8]) -> Outcome {
        let signature = self.secret.as_deref().map(|s| signature(s, body));
        let mut backoff = self.policy.first_backoff;
        for attempt in 1..=self.policy.attempts.max(1) {
            if attempt > 1 {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
                self.counters.retries.inc();
            }

            let mut request = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
            if let Some(signature) = &signature {
                request = request.header(SIGNATURE_HEADER, signature);
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => return Outcome::Delivered,
                Ok(response) if is_permanent(response.status()) => {
                    debug!(webhook = %self.host, status = %response.status(), "refused");
                    return Outcome::Failed;
                }
                Ok(response) => {
                    debug!(webhook = %self.host, attempt, status = %response.status(), "failed")
                }
                // Without the URL: reqwest's message names it, token and all.
                Err(e) => {
                    debug!(webhook = %self.host, attempt, cause = %e.without_url(), "failed")
                }
            }
        }
        Outcome::Failed
    }
}

/// A 4xx other than timeout and rate limiting: trying again would get the same answer.
fn is_permanent(status: StatusCode) -> bool {
    status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_in_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn webhook_config_refuses_unknown_fields_and_defaults_to_every_priority() {
        let hook: Webhook = toml::from_str("url = \"https://example.org/hook\"").unwrap();
        assert_eq!(
            (hook.min_priority, hook.secret.is_none()),
            (Priority::Low, true)
        );
        let high: Webhook =
            toml::from_str("url = \"http://h/x\"\nsecret = \"s\"\nmin_priority = \"high\"")
                .unwrap();
        assert_eq!(high.min_priority, Priority::High);
        assert!(toml::from_str::<Webhook>("url = \"http://h\"\nsecrte = \"s\"").is_err());
    }

    #[test]
    fn debug_output_hides_the_secret_and_the_url_path() {
        let hook = Webhook {
            url: "https://hooks.example.org/services/T0K3N".into(),
            secret: Some("s3cret".into()),
            min_priority: Priority::Low,
        };
        let shown = format!("{hook:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("T0K3N"),
            "{shown}"
        );
        assert!(shown.contains("hooks.example.org"), "{shown}");
    }

    #[tokio::test]
    async fn refuses_urls_that_are_not_http() {
        let hook = |url: &str| Webhook {
            url: url.into(),
            secret: None,
            min_priority: Priority::Low,
        };
        for bad in ["ftp://h/x", "not a url", ""] {
            let result = Notifier::start(vec![hook(bad)], RetryPolicy::default());
            assert!(
                matches!(result, Err(NotifyError::InvalidUrl { index: 0 })),
                "{bad}"
            );
        }
        assert!(
            Notifier::start(vec![hook("http://127.0.0.1:9/x")], RetryPolicy::default()).is_ok()
        );
    }

    #[test]
    fn only_client_errors_other_than_timeouts_and_rate_limits_are_permanent() {
        assert!(is_permanent(StatusCode::NOT_FOUND));
        assert!(!is_permanent(StatusCode::TOO_MANY_REQUESTS));
        assert!(!is_permanent(StatusCode::REQUEST_TIMEOUT));
        assert!(!is_permanent(StatusCode::INTERNAL_SERVER_ERROR));
    }
}
