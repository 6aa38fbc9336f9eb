//! The `presence-reaper` binary: parses the command line, loads the config,
//! starts logging and hands over to the library. Exit codes: 0 ok, 1 failure,
//! 2 usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use presence_reaper::config::{Config, Environment};
use presence_reaper::{App, dev, shutdown, telemetry};

/// Clears Microsoft Graph presence sessions that outlive the app that set them.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Config file (default: $PRESENCE_REAPER_CONFIG; without either, defaults
    /// and AZURE_* environment variables only).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: track sessions, clear them on deadline and on shutdown.
    ///
    /// Example: presence-reaper --config /etc/presence-reaper/config.toml run
    Run,
    /// Run the daemon against a built-in fake Graph: no tenant needed.
    ///
    /// Uses a temporary store and prints how to try it.
    /// Example: presence-reaper dev
    Dev,
    /// Validate the config and print it resolved, secrets redacted.
    ///
    /// Exits 2 naming the key if the config is bad.
    /// Example: presence-reaper --config config.toml check-config
    CheckConfig,
}

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Environment::from_process();
    let path = cli
        .config
        .or_else(|| env.var("PRESENCE_REAPER_CONFIG").map(PathBuf::from));
    let loaded = match cli.command {
        Command::Dev => dev::load_config(path.as_deref(), &env),
        _ => Config::load(path.as_deref(), &env),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("presence-reaper: configuration error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::CheckConfig => {
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Run => daemon(config, false),
        Command::Dev => daemon(config, true),
    }
}

fn daemon(config: Config, dev: bool) -> ExitCode {
    telemetry::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("presence-reaper: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async {
        let token = match shutdown::install() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("presence-reaper: cannot install signal handlers: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        if dev {
            return match dev::run(config, token).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("presence-reaper: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        let app = match App::build(config).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("presence-reaper: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        match app.run(token).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "failed");
                eprintln!("presence-reaper: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}
