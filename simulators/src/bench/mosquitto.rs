//! Debian's Mosquitto 2 (`/usr/sbin/mosquitto`), started for a benchmark with its own config
//! in a directory of the caller's: one TLS listener on a free loopback port that requires a
//! client certificate from the given CA, no persistence, in-flight and queue limits raised so
//! that it is measured, not throttled. Killed by PID when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::debug;

use super::BenchError;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Outgoing QoS 1/2 messages in flight per client (Mosquitto's default is 20).
const INFLIGHT: u32 = 1000;
/// Messages queued per client beyond those in flight (default 1000).
const QUEUED: u32 = 1_000_000;
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The CA and server certificate for the TLS listener.
#[derive(Clone, Debug)]
pub struct MosquittoTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    /// Writes `dir/mosquitto.conf` and starts Mosquitto on it; returns once it listens.
    pub fn start(dir: &Path, tls: &MosquittoTls) -> Result<Mosquitto, BenchError> {
        if !Path::new(MOSQUITTO).is_file() {
            return Err(BenchError::Broker(format!(
                "{MOSQUITTO} is missing: install Debian's mosquitto package"
            )));
        }
        let io = |what: String| move |source| BenchError::Process { what, source };
        let port = free_port().map_err(io("finding a free port".into()))?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, config(port, tls))
            .map_err(io(format!("writing {}", conf.display())))?;
        let log_path = dir.join("mosquitto.log");
        let log = std::fs::File::create(&log_path)
            .map_err(io(format!("creating {}", log_path.display())))?;
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io(format!("starting {MOSQUITTO}")))?;
        let mut mosquitto = Mosquitto { child, port };
        debug!(pid = mosquitto.pid(), port, "mosquitto started");

        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = mosquitto.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(BenchError::Broker(format!(
                    "mosquitto did not listen on 127.0.0.1:{port} ({}): {}",
                    exited.map_or("timed out".to_string(), |s| s.to_string()),
                    log.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(mosquitto)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        // Child::kill signals this child's own PID; wait reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(port: u16, tls: &MosquittoTls) -> String {
    // Started as root, Mosquitto switches to the `mosquitto` user before it reads the TLS
    // files, which the caller keeps private (0600 keys in 0700 directories); `user root`
    // keeps the identity it was started with (a non-root start ignores the option).
    format!(
        "# Written by telemon bench for one run.\n\
         user root\n\
         per_listener_settings false\n\
         allow_anonymous true\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         set_tcp_nodelay true\n\
         max_inflight_messages {INFLIGHT}\n\
         max_queued_messages {QUEUED}\n\
         max_queued_bytes 0\n\
         listener {port} 127.0.0.1\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n\
         use_identity_as_username true\n",
        ca = tls.ca.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
    )
}

/// A port the kernel just handed out on loopback; free again once the probe closes.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_requires_client_certificates_and_raises_limits() {
        let tls = MosquittoTls {
            ca: "/d/ca.crt".into(),
            cert: "/d/server.crt".into(),
            key: "/d/server.key".into(),
        };
        let text = config(18883, &tls);
        for line in [
            "listener 18883 127.0.0.1",
            "require_certificate true",
            "use_identity_as_username true",
            "persistence false",
            "cafile /d/ca.crt",
            "max_inflight_messages 1000",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
    }
}
