//! A trivial MQTT server that acknowledges everything at once and routes nothing: what the
//! load generator can produce on this machine when the other end costs almost nothing.
//!
//! It runs on a thread of its own with a single-threaded runtime, so that its work is not
//! scheduled among the generator's tasks; on a 2-core machine it still shares the CPU, which
//! makes the figure a lower bound of the generator's capacity.

use std::path::Path;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;
use tracing::trace;

use super::conn::{read_certs, Stream};
use super::wire;
use super::BenchError;

/// A running sink; stops when dropped.
pub struct Sink {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Listens on 127.0.0.1 on a free port, with TLS when given a server certificate and key
    /// (no client certificate is asked for: the client's cost of mutual TLS is one signature
    /// per connection).
    pub fn start(tls: Option<(&Path, &Path)>) -> Result<Sink, BenchError> {
        let acceptor = match tls {
            None => None,
            Some((cert, key)) => Some(acceptor(cert, key)?),
        };
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Process {
                what: "binding the sink".into(),
                source,
            })?;
        let bound = listener.local_addr().and_then(|addr| {
            listener.set_nonblocking(true)?;
            Ok(addr)
        });
        let port = bound
            .map_err(|source| BenchError::Process {
                what: "setting up the sink".into(),
                source,
            })?
            .port();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| BenchError::Process {
                what: "starting the sink's runtime".into(),
                source,
            })?;

        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    _ = accept_loop(listener, acceptor) => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(Sink {
            port,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, BenchError> {
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| BenchError::Pem {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(listener: TcpListener, acceptor: Option<TlsAcceptor>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let stream: Stream = match acceptor {
                None => Box::new(tcp),
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => Box::new(tls),
                    Err(e) => {
                        trace!(cause = %e, "sink: TLS handshake failed");
                        return;
                    }
                },
            };
            if let Err(e) = serve(stream).await {
                trace!(cause = %e, "sink: connection ended");
            }
        });
    }
}

/// Answers every packet of one connection in order, one write per read.
async fn serve(mut stream: Stream) -> Result<(), BenchError> {
    let io = |source| BenchError::Io {
        client: "sink".into(),
        source,
    };
    let mut input = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        if stream.read_buf(&mut input).await.map_err(io)? == 0 {
            return Ok(());
        }
        while let Some(packet) = wire::next_packet(&mut input)? {
            match packet.kind() {
                1 => out.put_slice(&[wire::CONNACK << 4, 2, 0, 0]),
                wire::PUBLISH => match packet.qos() {
                    1 => wire::ack(&mut out, wire::PUBACK, wire::publish_parts(&packet)?.0),
                    2 => wire::ack(&mut out, wire::PUBREC, wire::publish_parts(&packet)?.0),
                    _ => {}
                },
                wire::PUBREL => wire::ack(&mut out, wire::PUBCOMP, wire::ack_id(&packet)?),
                wire::SUBSCRIBE => {
                    let id = wire::ack_id(&packet)?;
                    let granted = packet.body.last().copied().unwrap_or(0x80);
                    out.put_slice(&[wire::SUBACK << 4, 3]);
                    out.put_u16(id);
                    out.put_u8(granted);
                }
                wire::PINGREQ => out.put_slice(&[0xd0, 0]),
                wire::DISCONNECT => return Ok(()),
                _ => {}
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(io)?;
            out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{run_load, LoadConfig, Transport};
    use super::*;

    #[tokio::test]
    async fn the_generator_measures_a_plain_sink_at_every_qos() {
        let sink = Sink::start(None).unwrap();
        for qos in 0..=2 {
            let mut config = LoadConfig::new("127.0.0.1", sink.port(), Transport::Plain);
            config.subscribers.clear();
            config.qos = qos;
            config.publishers.truncate(2);
            config.duration = Duration::from_millis(300);
            let summary = run_load(&config).await.unwrap();
            assert!(summary.published_per_s > 100.0, "QoS {qos}: {summary}");
            assert_eq!(summary.delivered, 0);
            if qos > 0 {
                assert_eq!(summary.acknowledged, summary.sent, "QoS {qos}: {summary:?}");
                assert!(summary.ack_latency.is_some_and(|l| l.p50_us <= l.p99_us));
            }
        }
    }

    #[tokio::test]
    async fn a_rate_limit_holds_the_publish_rate() {
        let sink = Sink::start(None).unwrap();
        let mut config = LoadConfig::new("127.0.0.1", sink.port(), Transport::Plain);
        config.subscribers.clear();
        config.publishers.truncate(1);
        config.rate = Some(200.0);
        config.duration = Duration::from_secs(1);
        let summary = run_load(&config).await.unwrap();
        assert!(
            (150.0..=250.0).contains(&summary.published_per_s),
            "{summary}"
        );
    }
}
