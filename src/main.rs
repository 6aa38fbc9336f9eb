//! The `presence-reaper` binary: parses the command line, loads the config,
//! starts logging and hands over to the library. Exit codes: 0 ok, 1 failure,
//! 2 usage or configuration error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use presence_reaper::cli::{self, ApiClient, CliError};
use presence_reaper::config::{Config, Environment};
use presence_reaper::{App, app, dev, shutdown, telemetry};

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
    #[command(
        after_help = "Example:\n  presence-reaper --config /etc/presence-reaper/config.toml run"
    )]
    Run,
    /// Run the daemon against a built-in fake Graph, with a temporary store: no tenant needed.
    #[command(after_help = "Example:\n  presence-reaper --config config.toml dev")]
    Dev,
    /// Validate the config and print it resolved, secrets redacted (exit 2 naming the bad key).
    #[command(after_help = "Example:\n  presence-reaper --config config.toml check-config")]
    CheckConfig,
    /// Tell the running daemon about a presence session (or renew it).
    #[command(after_help = "Examples:\n  \
        presence-reaper track adele@contoso.com --ttl 10m --owner bot-1\n  \
        presence-reaper track fa8bf3dc-eca7-46b7-bad1-db199b62afc3")]
    Track(TrackArgs),
    /// Clear one session now, or every session (of one owner), through the running daemon.
    #[command(after_help = "Examples:\n  \
        presence-reaper clear adele@contoso.com --wait\n  \
        presence-reaper clear --all --owner bot-1 --wait    # a bot's shutdown hook")]
    Clear(ClearArgs),
    /// List the running daemon's sessions.
    #[command(after_help = "Examples:\n  \
        presence-reaper list --state failed\n  \
        presence-reaper list --owner bot-1 --json")]
    List(ListArgs),
    /// Offline: clear every live session in the store, then exit (0 only if all ended cleared or dropped).
    #[command(
        after_help = "Takes the store's lock, so no daemon may be running on the same store.\n\
        Example:\n  presence-reaper --config /etc/presence-reaper/config.toml drain --deadline 2m"
    )]
    Drain(DrainArgs),
}

#[derive(Debug, Args)]
struct TrackArgs {
    /// Graph user id: object id (GUID) or userPrincipalName.
    user: String,
    /// How long until the session is cleared unless renewed (default: sessions.default_ttl).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Owner label, so that clear --all --owner can clear just these.
    #[arg(long)]
    owner: Option<String>,
    /// Presence session id (default: auth.client_id).
    #[arg(long)]
    session_id: Option<String>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["user", "all"]))]
struct ClearArgs {
    /// Graph user id to clear.
    user: Option<String>,
    /// Clear every live session (of --owner, if given).
    #[arg(long)]
    all: bool,
    /// With --all: only this owner's sessions.
    #[arg(long, requires = "all")]
    owner: Option<String>,
    /// With a user: the presence session id (default: auth.client_id).
    #[arg(long, conflicts_with = "all")]
    session_id: Option<String>,
    /// Wait (up to 30 s) until the clear has an outcome; exit 1 unless all ended cleared or dropped.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only sessions in this state: tracked, clearing, cleared, dropped, failed.
    #[arg(long)]
    state: Option<String>,
    /// Only this owner's sessions.
    #[arg(long)]
    owner: Option<String>,
    /// Print JSON (an array of sessions) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DrainArgs {
    /// Give up after this long; what is left is listed and stays in the store.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    deadline: Duration,
}

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Environment::from_process();
    let path = cli
        .config
        .or_else(|| env.var("PRESENCE_REAPER_CONFIG").map(PathBuf::from));
    let load = |dev_mode: bool| {
        let loaded = if dev_mode {
            dev::load_config(path.as_deref(), &env)
        } else {
            Config::load(path.as_deref(), &env)
        };
        loaded.map_err(|e| {
            eprintln!("presence-reaper: configuration error: {e}");
            ExitCode::from(EXIT_USAGE)
        })
    };
    let result = match cli.command {
        Command::Track(a) => Ok(client(ClientCommand::Track(a), path.as_deref())),
        Command::Clear(a) => Ok(client(ClientCommand::Clear(a), path.as_deref())),
        Command::List(a) => Ok(client(ClientCommand::List(a), path.as_deref())),
        Command::CheckConfig => load(false).map(|config| {
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }),
        Command::Run => load(false).map(|config| daemon(config, Mode::Run)),
        Command::Drain(args) => {
            load(false).map(|config| daemon(config, Mode::Drain(args.deadline)))
        }
        Command::Dev => load(true).map(|config| {
            let exe = std::env::args()
                .next()
                .unwrap_or_else(|| "presence-reaper".into());
            let prefix = match &path {
                Some(p) => format!("{exe} --config {}", p.display()),
                None => exe,
            };
            daemon(config, Mode::Dev(prefix))
        }),
    };
    result.unwrap_or_else(|code| code)
}

/// The commands that talk to a running daemon.
enum ClientCommand {
    Track(TrackArgs),
    Clear(ClearArgs),
    List(ListArgs),
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("presence-reaper: cannot start the runtime: {e}");
            None
        }
    }
}

/// `track`, `clear` and `list`: calls to the running daemon.
fn client(command: ClientCommand, path: Option<&Path>) -> ExitCode {
    let api = match Config::load_api(path) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("presence-reaper: configuration error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let Some(rt) = runtime() else {
        return ExitCode::from(EXIT_FAILURE);
    };
    let result = rt.block_on(async {
        let client = ApiClient::from_api_config(&api)?;
        match command {
            ClientCommand::Track(a) => {
                let s = client
                    .track(&a.user, a.ttl, a.owner.as_deref(), a.session_id.as_deref())
                    .await?;
                println!(
                    "{} {} (session {}) until {}",
                    s["state"].as_str().unwrap_or("tracked"),
                    s["user_id"].as_str().unwrap_or(&a.user),
                    s["session_id"].as_str().unwrap_or("?"),
                    s["expires_at"].as_str().unwrap_or("?"),
                );
                Ok(())
            }
            ClientCommand::Clear(a) if a.all => {
                let v = client.clear_all(a.owner.as_deref(), a.wait).await?;
                if !a.wait {
                    println!("{} sessions scheduled for clearing", v["scheduled"]);
                    return Ok(());
                }
                println!(
                    "cleared {}, dropped {}, failed {}, still pending {}",
                    v["cleared"], v["dropped"], v["failed"], v["pending"]
                );
                if v["failed"] == 0 && v["pending"] == 0 {
                    Ok(())
                } else {
                    Err(CliError::Failed(
                        "not every session ended cleared or dropped (see presence-reaper list)"
                            .into(),
                    ))
                }
            }
            ClientCommand::Clear(a) => {
                let user = a.user.unwrap_or_default();
                let s = client.clear(&user, a.session_id.as_deref(), a.wait).await?;
                let state = s["state"].as_str().unwrap_or("?");
                match s["last_error"].as_str() {
                    Some(e) => {
                        println!("{}: {state} ({e})", s["user_id"].as_str().unwrap_or(&user))
                    }
                    None => println!("{}: {state}", s["user_id"].as_str().unwrap_or(&user)),
                }
                if a.wait && state == "failed" {
                    return Err(CliError::Failed(format!("{user}: the clear failed")));
                }
                Ok(())
            }
            ClientCommand::List(a) => {
                let sessions = client.list(a.state.as_deref(), a.owner.as_deref()).await?;
                if a.json {
                    println!("{}", serde_json::Value::Array(sessions));
                } else {
                    print!("{}", cli::table(&sessions));
                }
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presence-reaper: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

enum Mode {
    Run,
    /// With the CLI prefix to print.
    Dev(String),
    Drain(Duration),
}

fn daemon(config: Config, mode: Mode) -> ExitCode {
    telemetry::init(&config.log);
    let Some(rt) = runtime() else {
        return ExitCode::from(EXIT_FAILURE);
    };
    rt.block_on(async {
        let token = match shutdown::install() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("presence-reaper: cannot install signal handlers: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        let result = match mode {
            Mode::Dev(prefix) => dev::run(config, &prefix, token)
                .await
                .map_err(|e| e.to_string()),
            Mode::Drain(deadline) => return drain(&config, deadline, token).await,
            Mode::Run => match App::build(config).await {
                Ok(app) => app.run(token).await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "failed");
                eprintln!("presence-reaper: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

async fn drain(
    config: &Config,
    deadline: Duration,
    cancel: tokio_util::sync::CancellationToken,
) -> ExitCode {
    let report = match app::drain_offline(config, deadline, cancel).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("presence-reaper: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let c = report.counts;
    println!(
        "drain: cleared {}, dropped {}, failed {}, still live {}",
        c.cleared, c.dropped, c.failed, c.pending
    );
    if report.unfinished.is_empty() {
        return ExitCode::SUCCESS;
    }
    println!("not cleared:");
    for s in &report.unfinished {
        println!(
            "  {} (session {}): {}{}",
            s.user_id,
            s.session_id,
            s.state.as_str(),
            s.last_error
                .as_deref()
                .map(|e| format!(", {e}"))
                .unwrap_or_default()
        );
    }
    ExitCode::from(EXIT_FAILURE)
}
