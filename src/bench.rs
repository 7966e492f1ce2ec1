//! `telemon bench`: the load generator against any broker (`bench run`, the default), and
//! the side-by-side comparison of telemon's mutual-TLS edge with Mosquitto 2 that the
//! performance targets are stated in (`bench compare`).
//!
//! The generator itself lives in `telemon_simulators::bench`; this module turns flags into a
//! load, issues certificates from a CA, starts and always kills the brokers it compares, and
//! prints the figures (with `--json`, one JSON object as the last line).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use telemon_broker::pki::{Pki, DEFAULT_DEVICE_DAYS};
use telemon_simulators::bench::mosquitto::{Mosquitto, MosquittoTls};
use telemon_simulators::bench::sink::Sink;
use telemon_simulators::bench::{
    numbered, run_load, Identity, Latency, LoadConfig, Summary, Transport, DEFAULT_DRAIN,
    DEFAULT_WINDOW,
};

use crate::data_dir;

/// The generator must produce at least this multiple of what a broker sustains for the
/// broker, not the generator, to be what a run measures.
const HEADROOM_NEEDED: f64 = 2.0;
/// How long `telemon up` may take to write its ready file.
const UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Lets telemon's edge carry the benchmark's topics for every certificate identity.
const BENCH_ACL: &str = "topic readwrite bench/#\n";

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Drive one broker (the default when no subcommand is given).
    Run(RunArgs),
    /// The same load against telemon (`telemon up`, mutual TLS) and Mosquitto 2, alternating.
    Compare(CompareArgs),
}

/// The load, common to `run` and `compare`. Defaults are the load DESIGN.md's targets are
/// stated for.
#[derive(Args, Debug, Clone)]
struct LoadArgs {
    /// Publishing connections, each with its own client id (and certificate).
    #[arg(long, default_value_t = 4)]
    publishers: usize,

    /// Subscribing connections; each receives every message.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,

    /// QoS of publishing and subscribing: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,

    /// Payload size in bytes (the first 8 carry the send time).
    #[arg(long, default_value_t = 100)]
    payload: usize,

    /// Messages per second per publisher; flat out when absent.
    #[arg(long)]
    rate: Option<f64>,

    /// Unacknowledged publishes per publisher (QoS 1 and 2).
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    window: usize,

    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,

    /// Print one JSON summary as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Security {
    Plain,
    Tls,
    Mtls,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The broker, host:port.
    #[arg(long, default_value = "localhost:8883")]
    broker: String,

    /// Plain TCP, TLS, or mutual TLS (a client certificate per connection).
    #[arg(long, value_enum, default_value_t = Security::Mtls)]
    security: Security,

    /// CA of the broker's certificate; the data directory's CA by default.
    #[arg(long)]
    ca: Option<PathBuf>,

    /// One client certificate for every connection (the broker's ACL must allow it);
    /// without it each connection gets its own, issued from the data directory's CA.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,

    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,

    /// Name the broker's certificate is checked for; the host of --broker by default.
    #[arg(long)]
    server_name: Option<String>,

    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Runs per broker, alternating telemon and Mosquitto.
    #[arg(long, default_value_t = 2)]
    rounds: usize,

    /// The telemon binary to start (`<it> up`); this executable by default.
    #[arg(long)]
    telemon: Option<PathBuf>,

    #[command(flatten)]
    load: LoadArgs,
}

pub async fn run(data_dir: &Path, args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        Some(BenchCommand::Run(run)) => run_one(data_dir, run).await,
        None => run_one(data_dir, args.run).await,
        Some(BenchCommand::Compare(compare)) => {
            // Dropping the comparison kills what it started, so Ctrl-C is handled by dropping.
            tokio::select! {
                result = run_compare(compare) => result,
                _ = tokio::signal::ctrl_c() => {
                    bail!("interrupted; the brokers started were killed")
                }
            }
        }
    }
}

impl LoadArgs {
    fn config(
        &self,
        host: &str,
        port: u16,
        transport: Transport,
        publishers: Vec<Identity>,
        subscribers: Vec<Identity>,
    ) -> anyhow::Result<LoadConfig> {
        if !(self.duration.is_finite() && self.duration > 0.0 && self.duration < 86_400.0) {
            bail!("--duration must be a number of seconds above zero and under a day");
        }
        let config = LoadConfig {
            host: host.to_string(),
            port,
            transport,
            publishers,
            subscribers,
            qos: self.qos,
            payload: self.payload,
            rate: self.rate,
            window: self.window,
            duration: Duration::from_secs_f64(self.duration),
            drain: DEFAULT_DRAIN,
        };
        config.validate()?;
        Ok(config)
    }

    fn publisher_ids(&self) -> Vec<Identity> {
        numbered("bench-pub", self.publishers)
    }

    fn subscriber_ids(&self) -> Vec<Identity> {
        numbered("bench-sub", self.subscribers)
    }
}

async fn run_one(data_dir: &Path, args: RunArgs) -> anyhow::Result<()> {
    let (host, port) = args
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_string(), p.parse().ok()?)))
        .context("--broker must be host:port")?;
    let mut publishers = args.load.publisher_ids();
    let mut subscribers = args.load.subscriber_ids();

    let transport = match args.security {
        Security::Plain => Transport::Plain,
        Security::Tls | Security::Mtls => Transport::Tls {
            ca: args
                .ca
                .clone()
                .unwrap_or_else(|| data_dir::certs(data_dir).join("ca.crt")),
            server_name: args.server_name.clone().unwrap_or_else(|| host.clone()),
        },
    };
    if args.security == Security::Mtls {
        match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => {
                for identity in publishers.iter_mut().chain(subscribers.iter_mut()) {
                    identity.cert = Some((cert.clone(), key.clone()));
                }
            }
            _ => {
                let pki = Pki::open_or_init(&data_dir::certs(data_dir))
                    .context("opening the data directory's CA")?;
                let out = data_dir.join("bench-devices");
                issue(&pki, &out, &mut publishers)?;
                issue(&pki, &out, &mut subscribers)?;
            }
        }
    }

    let config = args
        .load
        .config(&host, port, transport, publishers, subscribers)?;
    let summary = run_load(&config)
        .await
        .with_context(|| format!("benchmarking {host}:{port}"))?;
    println!("{}:\n{summary}", args.broker);
    if args.load.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}

/// Gives every identity a certificate from `pki` in `out`, issuing those not there yet.
fn issue(pki: &Pki, out: &Path, identities: &mut [Identity]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for identity in identities {
        let id = &identity.client_id;
        let (cert, key) = (out.join(format!("{id}.crt")), out.join(format!("{id}.key")));
        if !cert.exists() || !key.exists() {
            pki.issue(id, out, DEFAULT_DEVICE_DAYS)
                .with_context(|| format!("issuing a certificate for {id}"))?;
        }
        identity.cert = Some((cert, key));
    }
    Ok(())
}

/// One broker's figures over every round: the mean of each.
#[derive(Debug, Default, Serialize)]
struct BrokerFigures {
    published_per_s: f64,
    delivered_per_s: f64,
    missing: u64,
    ack_latency: Option<Latency>,
    delivery_latency: Option<Latency>,
    /// The generator's own CPU during these runs, percent of one core: a broker that answers
    /// message by message costs it more than the sink, which batches.
    generator_cpu_percent: f64,
    rounds: Vec<Summary>,
}

impl BrokerFigures {
    fn of(rounds: Vec<Summary>) -> BrokerFigures {
        let n = rounds.len().max(1) as f64;
        let mean = |f: fn(&Summary) -> f64| rounds.iter().map(f).sum::<f64>() / n;
        BrokerFigures {
            published_per_s: mean(|s| s.published_per_s),
            delivered_per_s: mean(|s| s.delivered_per_s),
            missing: rounds.iter().map(|s| s.missing).sum(),
            ack_latency: mean_latency(rounds.iter().map(|s| s.ack_latency)),
            delivery_latency: mean_latency(rounds.iter().map(|s| s.delivery_latency)),
            generator_cpu_percent: mean(|s| s.generator_cpu_percent.unwrap_or(0.0)),
            rounds,
        }
    }

    /// Messages the generator handles per second against this broker: each publish and each
    /// delivery.
    fn generator_load(&self) -> f64 {
        self.published_per_s + self.delivered_per_s
    }
}

fn mean_latency(all: impl Iterator<Item = Option<Latency>>) -> Option<Latency> {
    let all: Vec<Latency> = all.collect::<Option<_>>()?;
    let n = all.len() as u64;
    if n == 0 {
        return None;
    }
    let mean = |f: fn(&Latency) -> u64| all.iter().map(f).sum::<u64>() / n;
    Some(Latency {
        count: all.iter().map(|l| l.count).sum(),
        p50_us: mean(|l| l.p50_us),
        p99_us: mean(|l| l.p99_us),
        p999_us: mean(|l| l.p999_us),
        max_us: all.iter().map(|l| l.max_us).max().unwrap_or(0),
    })
}

/// telemon / Mosquitto: above 1 is telemon faster for rates, slower for latencies.
#[derive(Debug, Serialize)]
struct Ratio {
    /// End to end: deliveries per second when there are subscribers, else publishes.
    throughput: f64,
    /// Of publish -> subscriber p99 when there are subscribers, else publish -> ack p99.
    p99: Option<f64>,
    published_per_s: f64,
    delivered_per_s: f64,
    ack_p99: Option<f64>,
    delivery_p99: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Generator {
    /// Publishes per second the generator produced against the acknowledging sink.
    sink_published_per_s: f64,
    /// That, over the most messages per second it handled against a broker.
    headroom: f64,
    sufficient: bool,
}

#[derive(Debug, Serialize)]
struct Comparison {
    qos: u8,
    payload_bytes: usize,
    publishers: usize,
    subscribers: usize,
    duration_s: f64,
    rounds: usize,
    transport: &'static str,
    telemon: BrokerFigures,
    mosquitto: BrokerFigures,
    ratio: Ratio,
    generator: Generator,
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("telemon-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn run_compare(args: CompareArgs) -> anyhow::Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let temp = TempDir::new()?;
    let dir = &temp.0;
    let data = dir.join("data");
    let pki = Pki::open_or_init(&data_dir::certs(&data)).context("creating the bench CA")?;
    let (server_cert, server_key) = pki
        .ensure_server_cert(&[])
        .context("issuing the server certificate")?;
    let devices = dir.join("devices");
    let mut publishers = args.load.publisher_ids();
    let mut subscribers = args.load.subscriber_ids();
    issue(&pki, &devices, &mut publishers)?;
    issue(&pki, &devices, &mut subscribers)?;
    let transport = Transport::Tls {
        ca: pki.ca_path(),
        server_name: "localhost".into(),
    };

    let exe = match &args.telemon {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("finding the telemon executable")?,
    };
    let mut telemon = TelemonUp::start(&exe, dir).await?;
    let mosquitto_dir = dir.join("mosquitto");
    std::fs::create_dir_all(&mosquitto_dir)?;
    let mosquitto_tls = MosquittoTls {
        ca: pki.ca_path(),
        cert: server_cert.clone(),
        key: server_key.clone(),
    };
    let mosquitto = Mosquitto::start(&mosquitto_dir, &mosquitto_tls)?;
    let load = |port| {
        args.load.config(
            "127.0.0.1",
            port,
            transport.clone(),
            publishers.clone(),
            subscribers.clone(),
        )
    };
    say(
        &args.load,
        &format!(
            "telemon up (pid {}, port {}) and mosquitto (pid {}, port {}), mutual TLS",
            telemon.pid(),
            telemon.port,
            mosquitto.pid(),
            mosquitto.port()
        ),
    );

    // The generator alone first: flat out, publishers only, against a TLS sink.
    let sink = Sink::start(Some((&server_cert, &server_key)))?;
    let mut sink_load = load(sink.port())?;
    sink_load.subscribers.clear();
    sink_load.rate = None;
    let sink_summary = run_load(&sink_load)
        .await
        .context("running against the sink")?;
    drop(sink);
    say(
        &args.load,
        &format!("generator against a sink:\n{sink_summary}"),
    );

    let mut telemon_rounds = Vec::new();
    let mut mosquitto_rounds = Vec::new();
    for round in 1..=args.rounds {
        let summary = run_load(&load(telemon.port)?)
            .await
            .with_context(|| format!("round {round} against telemon"))?;
        say(&args.load, &format!("round {round}, telemon:\n{summary}"));
        telemon_rounds.push(summary);
        telemon.check_alive()?;

        let summary = run_load(&load(mosquitto.port())?)
            .await
            .with_context(|| format!("round {round} against mosquitto"))?;
        say(&args.load, &format!("round {round}, mosquitto:\n{summary}"));
        mosquitto_rounds.push(summary);
    }
    drop(mosquitto);
    drop(telemon);

    let comparison = compare(&args, telemon_rounds, mosquitto_rounds, &sink_summary);
    print_comparison(&comparison);
    if args.load.json {
        println!("{}", serde_json::to_string(&comparison)?);
    }
    Ok(())
}

fn compare(
    args: &CompareArgs,
    telemon: Vec<Summary>,
    mosquitto: Vec<Summary>,
    sink: &Summary,
) -> Comparison {
    let telemon = BrokerFigures::of(telemon);
    let mosquitto = BrokerFigures::of(mosquitto);
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let p99 = |a: Option<Latency>, b: Option<Latency>| {
        Some(div(a?.p99_us as f64, b?.p99_us.max(1) as f64))
    };
    let end_to_end = args.load.subscribers > 0;
    let ratio = Ratio {
        throughput: match end_to_end {
            true => div(telemon.delivered_per_s, mosquitto.delivered_per_s),
            false => div(telemon.published_per_s, mosquitto.published_per_s),
        },
        p99: match end_to_end {
            true => p99(telemon.delivery_latency, mosquitto.delivery_latency),
            false => p99(telemon.ack_latency, mosquitto.ack_latency),
        },
        published_per_s: div(telemon.published_per_s, mosquitto.published_per_s),
        delivered_per_s: div(telemon.delivered_per_s, mosquitto.delivered_per_s),
        ack_p99: p99(telemon.ack_latency, mosquitto.ack_latency),
        delivery_p99: p99(telemon.delivery_latency, mosquitto.delivery_latency),
    };
    let busiest = telemon.generator_load().max(mosquitto.generator_load());
    let headroom = div(sink.published_per_s, busiest);
    Comparison {
        qos: args.load.qos,
        payload_bytes: args.load.payload,
        publishers: args.load.publishers,
        subscribers: args.load.subscribers,
        duration_s: args.load.duration,
        rounds: args.rounds,
        transport: "mutual TLS",
        telemon,
        mosquitto,
        ratio,
        generator: Generator {
            sink_published_per_s: sink.published_per_s,
            headroom,
            sufficient: headroom >= HEADROOM_NEEDED,
        },
    }
}

fn print_comparison(c: &Comparison) {
    let latency = |l: Option<Latency>| {
        l.map_or("-".to_string(), |l| {
            format!("{} / {} / {} us", l.p50_us, l.p99_us, l.p999_us)
        })
    };
    println!(
        "\nQoS {}, {} B, {} publishers -> {} subscribers, mutual TLS, {} x {} s per broker\n",
        c.qos, c.payload_bytes, c.publishers, c.subscribers, c.rounds, c.duration_s
    );
    println!(
        "{:<10} {:>12} {:>12} {:>26} {:>28} {:>9}",
        "broker",
        "published/s",
        "delivered/s",
        "ack p50/p99/p99.9",
        "delivery p50/p99/p99.9",
        "gen. CPU"
    );
    for (name, f) in [("telemon", &c.telemon), ("mosquitto", &c.mosquitto)] {
        println!(
            "{name:<10} {:>12.0} {:>12.0} {:>26} {:>28} {:>8.0}%",
            f.published_per_s,
            f.delivered_per_s,
            latency(f.ack_latency),
            latency(f.delivery_latency),
            f.generator_cpu_percent
        );
    }
    let opt = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
    println!(
        "ratio telemon/mosquitto: throughput {:.2} (published {:.2}, delivered {:.2}), \
         p99 {} (ack {}, delivery {})",
        c.ratio.throughput,
        c.ratio.published_per_s,
        c.ratio.delivered_per_s,
        opt(c.ratio.p99),
        opt(c.ratio.ack_p99),
        opt(c.ratio.delivery_p99)
    );
    println!(
        "generator: {:.0} publishes/s against a sink, {:.1}x the most it handled against a \
         broker",
        c.generator.sink_published_per_s, c.generator.headroom
    );
    if !c.generator.sufficient {
        println!(
            "WARNING: the generator has less than {HEADROOM_NEEDED}x headroom on this machine; \
             the broker figures may be limited by the generator"
        );
    }
    for (name, f) in [("telemon", &c.telemon), ("mosquitto", &c.mosquitto)] {
        if f.missing > 0 && c.qos > 0 {
            println!("WARNING: {name} did not deliver {} messages", f.missing);
        }
    }
}

/// Progress lines go to stderr with --json, so that stdout ends with the JSON.
fn say(load: &LoadArgs, text: &str) {
    if load.json {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}

/// `telemon up` as a child process on SQLite in a temporary data directory, the benchmark
/// topics allowed by its ACL; killed by PID when dropped.
struct TelemonUp {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl TelemonUp {
    async fn start(exe: &Path, dir: &Path) -> anyhow::Result<TelemonUp> {
        let acl = dir.join("bench.acl");
        std::fs::write(&acl, BENCH_ACL).with_context(|| format!("writing {}", acl.display()))?;
        let ready = dir.join("ready.json");
        let log = dir.join("telemon.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(exe)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "up",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .arg("--acl")
            .arg(&acl)
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} up", exe.display()))?;
        let mut up = TelemonUp {
            child,
            port: 0,
            log,
        };

        let deadline = Instant::now() + UP_TIMEOUT;
        while !ready.exists() {
            up.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "telemon up not ready within {UP_TIMEOUT:?}: {}",
                    up.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = std::fs::read_to_string(&ready)
            .with_context(|| format!("reading {}", ready.display()))?;
        let ready: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", ready.display()))?;
        up.port = ready["mqtt"]
            .as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
            .context("no MQTT address in telemon's ready file")?;
        Ok(up)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("telemon up exited with {status}: {}", self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for TelemonUp {
    fn drop(&mut self) {
        // Its own PID only; the data directory is temporary, so no clean stop is needed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
