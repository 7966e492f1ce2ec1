//! `telemon certs`: the development CA and device certificates.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use telemon_broker::pki::{Pki, DEFAULT_DEVICE_DAYS};

use crate::data_dir;

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the CA in <data-dir>/certs (nothing changes if it exists).
    Init,
    /// Issue a client certificate for a device: DIR/<device-id>.crt and .key.
    Issue {
        device_id: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[arg(long, default_value_t = DEFAULT_DEVICE_DAYS)]
        days: u32,
    },
    /// Revoke every certificate of a device (or one serial number). A running broker refuses
    /// it within a second and disconnects its live session.
    Revoke { device_id_or_serial: String },
    /// List issued certificates.
    List,
}

pub fn run(data_dir: &Path, command: CertsCommand) -> anyhow::Result<()> {
    let dir = data_dir::certs(data_dir);
    let pki =
        Pki::open_or_init(&dir).with_context(|| format!("opening the CA in {}", dir.display()))?;
    match command {
        CertsCommand::Init => println!("CA ready: {}", pki.ca_path().display()),
        CertsCommand::Issue {
            device_id,
            out,
            days,
        } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let issued = pki
                .issue(&device_id, &out, days)
                .with_context(|| format!("issuing a certificate for {device_id:?}"))?;
            println!("certificate: {}", issued.cert_path.display());
            println!("key:         {}", issued.key_path.display());
            println!("serial:      {}", issued.record.serial);
            println!("CA:          {}", pki.ca_path().display());
        }
        CertsCommand::Revoke {
            device_id_or_serial,
        } => {
            let revoked = pki
                .revoke(&device_id_or_serial)
                .with_context(|| format!("revoking {device_id_or_serial:?}"))?;
            if revoked.is_empty() {
                println!("already revoked: {device_id_or_serial}");
            }
            for record in revoked {
                println!("revoked {} (serial {})", record.identity, record.serial);
            }
        }
        CertsCommand::List => {
            let mut out = format!(
                "{:<34} {:<32} {:<22} revoked\n",
                "serial", "identity", "not after"
            );
            for r in pki.list()? {
                let revoked = r.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default();
                out.push_str(&format!(
                    "{:<34} {:<32} {:<22} {}\n",
                    r.serial,
                    r.identity,
                    r.not_after.format("%Y-%m-%dT%H:%M:%SZ"),
                    revoked
                ));
            }
            print_listing(&out)?;
        }
    }
    Ok(())
}

/// Writes a listing to stdout. A reader that stops early (`telemon certs list | head`) is not
/// an error.
fn print_listing(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("writing to stdout")?),
    }
}
