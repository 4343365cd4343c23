//! `outpost`: the gateway binary. A thin `main`: parse the command line, load and validate the
//! configuration without binding anything (exit 64 on bad configuration), then run until SIGTERM or
//! SIGINT and stop in order (see `app`).

#![forbid(unsafe_code)]

mod app;
mod broker_state;
mod discovery;
mod health;
mod http;
mod ingest;
mod lifecycle;
mod metrics;
mod registry;
mod route;
mod status;
mod sync;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_config::{Config, Overrides, ProcessEnv};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Exit code for a configuration that does not validate (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
    version,
    about = "MQTT/CoAP-native IoT edge gateway that keeps every reading until the cloud has it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (with no file: broker on 0.0.0.0:1883, data in ./outpost-data, no upstream).
    Run {
        /// Configuration file (TOML). See `outpost print-default-config`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// MQTT listener address; replaces the listeners of the file.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Upstream broker URL (mqtt://host:port or mqtts://host:port); everything is forwarded at QoS 1.
        #[arg(long)]
        upstream: Option<String>,
        /// Directory for the database.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a configuration file; exit 64 listing every problem.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the annotated default configuration.
    PrintDefaultConfig,
    /// List the devices in the registry (how found, status, last seen, message counts).
    Devices {
        /// Configuration file (to find the data directory).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (overrides the file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the dead letters: payloads that did not decode as their route's format.
    DeadLetters {
        /// Configuration file (to find the data directory).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (overrides the file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// At most this many, newest first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the records the upstream refused for good (too large, not authorized...): kept whole
    /// with their seq, outside the backlog.
    Refused {
        /// Configuration file (to find the data directory).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (overrides the file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show buffer depth, oldest unsynced age, upstream state and counters.
    Status {
        /// Configuration file (to find the data directory).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (overrides the file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::PrintDefaultConfig => {
            print!("{}", outpost_config::default_config_toml());
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match load(Some(&file), &Overrides::default()) {
            Ok(config) => {
                let warnings = config.warnings();
                if !warnings.is_empty() {
                    eprintln!("{}: {} warning(s):", file.display(), warnings.len());
                    for w in &warnings {
                        eprintln!("  {w}");
                    }
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Devices {
            config,
            data_dir,
            json,
        } => inspect(config, data_dir, |config| {
            let list = status::devices(&config.storage.db_path())?;
            if json {
                return Ok(serde_json::to_string_pretty(&list)? + "\n");
            }
            let now = metrics::now_ms();
            let mut out = format!(
                "{:<32} {:<8} {:>10} {:>12}  found by\n",
                "device", "status", "messages", "last seen"
            );
            for d in list {
                let found: Vec<String> = d
                    .found_by
                    .iter()
                    .map(|f| format!("{f:?}").to_lowercase())
                    .collect();
                out.push_str(&format!(
                    "{:<32} {:<8} {:>10} {:>10.0} s  {}\n",
                    d.id.as_str(),
                    format!("{:?}", d.status).to_lowercase(),
                    d.messages,
                    now.saturating_sub(d.last_seen_ms) as f64 / 1000.0,
                    found.join(",")
                ));
            }
            Ok(out)
        }),
        Command::DeadLetters {
            config,
            data_dir,
            limit,
            json,
        } => inspect(config, data_dir, |config| {
            let list = status::dead_letters(&config.storage.db_path(), limit)?;
            if json {
                return Ok(serde_json::to_string_pretty(&list)? + "\n");
            }
            Ok(list
                .iter()
                .map(|d| {
                    format!(
                        "#{} {} {} [{}] {} bytes: {}\n",
                        d.id, d.at_ms, d.topic, d.source, d.payload_bytes, d.reason
                    )
                })
                .collect())
        }),
        Command::Refused {
            config,
            data_dir,
            limit,
            json,
        } => inspect(config, data_dir, |config| {
            let list = status::refused(&config.storage.db_path(), limit)?;
            if json {
                return Ok(serde_json::to_string_pretty(&list)? + "\n");
            }
            Ok(list
                .iter()
                .map(|r| {
                    format!(
                        "seq {} {} [{}] {} bytes, refused at {}: {}\n",
                        r.seq, r.topic, r.priority, r.payload_bytes, r.refused_at_ms, r.reason
                    )
                })
                .collect())
        }),
        Command::Status {
            config,
            data_dir,
            json,
        } => inspect(config, data_dir, |config| {
            let (report, health) = status_report(config)?;
            if !json {
                return Ok(status::render(&report));
            }
            let mut value = serde_json::to_value(&report)?;
            if let (serde_json::Value::Object(map), Some(h)) = (&mut value, health) {
                map.insert("health".to_owned(), h);
            }
            Ok(serde_json::to_string_pretty(&value)? + "\n")
        }),
        Command::Run {
            config,
            listen,
            upstream,
            data_dir,
        } => {
            let overrides = Overrides {
                listen,
                upstream_url: upstream,
                data_dir,
            };
            let config = match load(config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&config.log.level);
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The read-only subcommands (status, devices, dead-letters): load the configuration (only to
/// find the data directory), produce the text, print it; exit 64 on bad configuration, 1 on
/// any other error.
fn inspect(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    produce: impl FnOnce(&Config) -> anyhow::Result<String>,
) -> ExitCode {
    let overrides = Overrides {
        data_dir,
        ..Overrides::default()
    };
    let config = match load(config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match produce(&config) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads and validates the configuration; on failure prints every problem and returns exit 64.
fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ExitCode> {
    let text = match file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("outpost: cannot read {}: {e}", path.display());
                return Err(ExitCode::from(EXIT_CONFIG));
            }
        },
        None => None,
    };
    Config::load(text.as_deref(), overrides, &ProcessEnv).map_err(|errors| {
        let source = file.map_or("configuration".to_owned(), |p| p.display().to_string());
        eprintln!("outpost: {source} is invalid:");
        for e in &errors.0 {
            eprintln!("  {}: {}", e.path, e.message);
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The status of the gateway configured by `config`: from its live status endpoint when it
/// answers, else from the database (which also works while the gateway is stopped or wedged).
fn status_report(
    config: &Config,
) -> anyhow::Result<(status::StatusReport, Option<serde_json::Value>)> {
    if let Some(addr) = config.health.listen {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        match runtime.block_on(status::fetch_report(addr)) {
            Ok(Some(mut value)) => {
                let health = value.as_object_mut().and_then(|m| m.remove("health"));
                match serde_json::from_value::<status::StatusReport>(value) {
                    Ok(report) => return Ok((report, health)),
                    Err(e) => eprintln!(
                        "outpost: status endpoint at {addr} sent an unexpected shape ({e}); reading the database instead"
                    ),
                }
            }
            Ok(None) => {}
            Err(e) => eprintln!("outpost: {e:#}; reading the database instead"),
        }
    }
    Ok((status::read_report(&config.storage.db_path())?, None))
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(config: Config) -> anyhow::Result<()> {
    // rumqttc's TLS needs a process-wide crypto provider; ring keeps aws-lc-sys out of the build.
    // An error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outpost")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            match wait_for_signal().await {
                Ok(name) => info!(signal = name, "stopping"),
                Err(e) => error!(error = %e, "cannot listen for signals; stopping"),
            }
            signals.cancel();
        });
        app::run(config, shutdown).await
    })
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
