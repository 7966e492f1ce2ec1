//! The configuration file (`--config telemon.toml`): settings that do not fit on a command
//! line. Every section is optional; command-line flags win over the file. Relative paths
//! are read from the file's own directory. `telemon.example.toml` is the reference.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use telemon_alerts::notify::Webhook;
use telemon_alerts::rule::{Rule, RuleFile};
use telemon_broker::edge::Limits;
use telemon_broker::pki::IdentitySource;
use telemon_ingest::decode::{DecodeConfig, Decoder};
use telemon_model::bus::{BusConfig, BusTls};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Connection limits, packet size and timeouts of the device listener.
    #[serde(default)]
    pub limits: Limits,
    pub acl_file: Option<PathBuf>,
    pub identity: Option<IdentitySource>,
    /// Extra DNS names or addresses for the broker's certificate.
    #[serde(default)]
    pub server_names: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Topic mappings for foreign conventions (see ingest/mappings.toml).
    pub mappings_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    pub rules_file: Option<PathBuf>,
    /// Where every alert transition is POSTed, signed when a secret is set.
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config = Config::parse(&text).with_context(|| format!("in {}", path.display()))?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for path in [
            &mut self.broker.acl_file,
            &mut self.ingest.mappings_file,
            &mut self.alerts.rules_file,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// How a service that runs alone reaches its broker (Mosquitto, EMQX, or telemon's own edge).
#[derive(clap::Args, Debug, Clone)]
pub struct BrokerArgs {
    /// The broker: mqtt://host:port, or mqtts://host:port with --broker-ca.
    #[arg(long, env = "TELEMON_BROKER_URL")]
    pub broker_url: String,

    /// CA certificate of the broker (for mqtts://).
    #[arg(long)]
    pub broker_ca: Option<PathBuf>,

    /// Client certificate, for brokers that require mutual TLS (with --broker-key).
    #[arg(long, requires = "broker_key")]
    pub broker_cert: Option<PathBuf>,

    #[arg(long, requires = "broker_cert")]
    pub broker_key: Option<PathBuf>,
}

impl BrokerArgs {
    pub fn bus(&self) -> anyhow::Result<BusConfig> {
        let mut bus = BusConfig::from_url(&self.broker_url)?;
        if let Some(ca) = &self.broker_ca {
            let client = self.broker_cert.clone().zip(self.broker_key.clone());
            bus.tls = Some(BusTls {
                ca: ca.clone(),
                client,
            });
        }
        Ok(bus)
    }
}

/// The alert rules: a rules file, or the built-in defaults (`src/default-rules.toml`).
pub fn load_rules(path: Option<&Path>) -> anyhow::Result<Vec<Rule>> {
    let text = match path {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => DEFAULT_RULES.to_string(),
    };
    let origin = path.map_or("the default rules".into(), |p| p.display().to_string());
    RuleFile::from_toml(&text).with_context(|| format!("in {origin}"))
}

const DEFAULT_RULES: &str = include_str!("default-rules.toml");

/// The ingest decoder: native topics only, or with the mappings of a mappings file.
pub fn load_decoder(mappings: Option<&Path>) -> anyhow::Result<Decoder> {
    let Some(path) = mappings else {
        return Ok(Decoder::native_only());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config =
        DecodeConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?;
    Decoder::from_config(config).with_context(|| format!("in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_file_parses_and_its_files_exist() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("telemon.example.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.broker.limits.max_per_address, 1000);
        assert_eq!(config.alerts.webhooks.len(), 1);
        for file in [
            &config.broker.acl_file,
            &config.ingest.mappings_file,
            &config.alerts.rules_file,
        ] {
            let file = file.as_ref().expect("the reference names every file");
            assert!(file.exists(), "{} does not exist", file.display());
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("[broker]\nmax_conections = 5\n").unwrap_err();
        assert!(format!("{err:#}").contains("max_conections"), "{err:#}");
        assert!(Config::parse("[brokr]\n").is_err());
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = Config::parse("").unwrap();
        assert!(config.alerts.webhooks.is_empty());
        assert_eq!(
            config.broker.limits.max_connections,
            Limits::default().max_connections
        );
    }
}
