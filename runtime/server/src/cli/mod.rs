//! The `spate` command line: argument definitions (clap derive) and the client commands
//! that talk to a running runtime over its HTTP API.
//!
//! `spate up` itself is wired in `main.rs`; everything here is a client of the API and
//! never opens the data directory except to read the API token file, except `spate plugin
//! new` and `spate plugin build` ([`scaffold`]), which work on a local plugin project.

pub mod client;
pub mod events;
pub mod parked;
pub mod plugin;
pub mod replay;
pub mod scaffold;

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default data directory, relative to where `spate` runs.
pub const DEFAULT_DATA_DIR: &str = ".spate";

const ROOT_EXAMPLES: &str = "\
Examples:
  # run everything on this machine (data in ./.spate, API on 127.0.0.1:8780)
  spate up

  # in another terminal: build the example plugin, deploy it, send it an event
  cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
  spate plugin deploy plugins/order-totals
  spate events send orders --key c-42 '{\"order_id\":\"o-1\",\"customer_id\":\"c-42\",\"amount_cents\":1250,\"currency\":\"EUR\"}'

  # watch what it emits (Ctrl-C to stop)
  spate events tail customer-totals --follow

  # a plugin with on-failure = \"park-key\": its parked keys, then after a fix, redrive one
  spate parked ls order-totals
  spate parked show order-totals c-42
  spate parked redrive order-totals c-42

  # send a plugin's dead letters since a time back through its active version
  spate dlq redrive order-totals --from 2025-06-01T08:00:00Z

Client commands find the API at --api (default http://127.0.0.1:8780) and read the API token
from .spate/api-token, which `spate up` writes; pass --token or --data-dir if yours differ.";

/// Spate: run sandboxed WebAssembly handlers for every event on your topics.
#[derive(Debug, Parser)]
#[command(name = "spate", version, after_help = ROOT_EXAMPLES)]
pub struct Cli {
    /// Options shared by every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// URL of the Spate API that client commands talk to.
    #[arg(
        long,
        global = true,
        env = "SPATE_API",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8780",
        value_name = "URL"
    )]
    pub api: String,

    /// API token for commands that change something [default: the contents of
    /// <data-dir>/api-token]. With `spate up`, the token the server requires.
    #[arg(
        long,
        global = true,
        env = "SPATE_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Data directory: where `spate up` keeps the event log, state, plugins and the
    /// generated API token, and where client commands look for that token [default: .spate].
    #[arg(
        long,
        global = true,
        env = "SPATE_DATA_DIR",
        hide_env_values = true,
        value_name = "DIR"
    )]
    pub data_dir: Option<PathBuf>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the runtime and its HTTP API in the foreground until Ctrl-C or SIGTERM.
    #[command(after_help = UP_EXAMPLES)]
    Up(UpArgs),
    /// Deploy plugins and manage their versions.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Send events to topics and read them back.
    #[command(subcommand)]
    Events(EventsCommand),
    /// See the keys a plugin parked (`on-failure = "park-key"`) and redrive or discard them.
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Send a plugin's dead letters back through its active version.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Run stored events through a plugin version with nothing applied, and compare what
    /// each did with its effect record.
    #[command(after_help = replay::HELP)]
    Replay(replay::ReplayArgs),
}

const UP_EXAMPLES: &str = "\
Settings come from defaults, then --config FILE, then SPATE_* environment variables
(e.g. SPATE_API__LISTEN=0.0.0.0:8780), then these flags.

Examples:
  spate up
  spate up --data-dir /var/lib/spate --listen 0.0.0.0:8780
  spate up --config spate-runtime.toml
  RUST_LOG=debug spate up";

/// Options of `spate up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Runtime configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address the HTTP API listens on [default: 127.0.0.1:8780].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// `spate plugin ...`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Create a plugin project (handler, manifest) in Rust, Python or JavaScript.
    #[command(after_help = scaffold::NEW_HELP)]
    New(scaffold::NewArgs),
    /// Build a plugin project into a component with its language's toolchain.
    #[command(after_help = scaffold::BUILD_HELP)]
    Build(scaffold::BuildArgs),
    /// Upload a plugin version (manifest + compiled component) and make it active.
    #[command(after_help = plugin::DEPLOY_HELP)]
    Deploy(plugin::DeployArgs),
    /// List deployed plugins and their versions.
    #[command(after_help = "Example:\n  spate plugin ls")]
    Ls,
    /// Show one plugin: its active manifest, versions and activation history (JSON).
    #[command(after_help = "Example:\n  spate plugin show order-totals")]
    Show {
        /// Plugin name.
        name: String,
    },
    /// Make a stored version the active one (a hot swap: in-flight events finish on the old one).
    #[command(after_help = "Example:\n  spate plugin activate order-totals 1.2.0")]
    Activate {
        /// Plugin name.
        name: String,
        /// Version to activate, as listed by `spate plugin ls`.
        version: String,
    },
    /// Switch back to the version that was active before the current one.
    #[command(after_help = "Example:\n  spate plugin rollback order-totals")]
    Rollback {
        /// Plugin name.
        name: String,
    },
    /// Remove a plugin and all its versions (its consumer positions are kept). Its state
    /// namespace and cache prefix stay reserved for it until purged.
    #[command(
        after_help = "Examples:\n  spate plugin rm order-totals\n  spate plugin rm order-totals --purge"
    )]
    Rm {
        /// Plugin name.
        name: String,
        /// Also delete its state and release its namespace (works on a removed plugin).
        #[arg(long)]
        purge: bool,
    },
    /// How the shadow candidate (`deploy --shadow`) compares with the active version:
    /// events compared, identical, differing (the first ones with their diffs), traps.
    #[command(after_help = plugin::SHADOW_HELP)]
    Shadow {
        /// Plugin name.
        name: String,
        /// Print the whole report as JSON.
        #[arg(long)]
        json: bool,
        /// Stop the shadow candidate (it stays stored).
        #[arg(long)]
        stop: bool,
    },
    /// Make the shadow candidate the active version.
    #[command(after_help = "Example:\n  spate plugin promote order-totals")]
    Promote {
        /// Plugin name.
        name: String,
    },
}

/// `spate events ...`
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Append one event, or every line of a JSONL file, to a topic.
    #[command(after_help = events::SEND_HELP)]
    Send(events::SendArgs),
    /// Print a topic's events, one JSON object per line.
    #[command(after_help = events::TAIL_HELP)]
    Tail(events::TailArgs),
}

/// `spate parked ...`
#[derive(Debug, Subcommand)]
pub enum ParkedCommand {
    /// List a plugin's parked keys: since when, why, and how many events wait.
    #[command(after_help = parked::LS_HELP)]
    Ls(parked::LsArgs),
    /// Show one parked key and its events in source order.
    #[command(after_help = parked::SHOW_HELP)]
    Show(parked::ShowArgs),
    /// Handle parked keys' events again, in order, through the active version.
    #[command(after_help = parked::REDRIVE_HELP)]
    Redrive(parked::KeysArgs),
    /// Send parked keys' events to the dead-letter topic and unpark the keys.
    #[command(after_help = parked::DISCARD_HELP)]
    Discard(parked::KeysArgs),
}

/// `spate dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Handle a plugin's dead letters again (each at most once) through its active version.
    #[command(after_help = parked::DLQ_REDRIVE_HELP)]
    Redrive(parked::DlqRedriveArgs),
}

/// Run a client command against the API.
pub async fn run_client(global: &GlobalArgs, command: Command) -> anyhow::Result<()> {
    // Local commands: no API involved.
    let command = match command {
        Command::Plugin(PluginCommand::New(args)) => return scaffold::new(args),
        Command::Plugin(PluginCommand::Build(args)) => {
            return tokio::task::spawn_blocking(move || scaffold::build(args)).await?;
        }
        other => other,
    };
    let client = client::ApiClient::new(global)?;
    match command {
        Command::Up(_) => anyhow::bail!("`spate up` is not a client command"),
        Command::Plugin(cmd) => plugin::run(&client, cmd).await,
        Command::Events(EventsCommand::Send(args)) => events::send(&client, args).await,
        Command::Events(EventsCommand::Tail(args)) => events::tail(&client, args).await,
        Command::Parked(cmd) => parked::run(&client, cmd).await,
        Command::Dlq(DlqCommand::Redrive(args)) => parked::dlq_redrive(&client, args).await,
        Command::Replay(args) => replay::run(&client, args).await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_has_an_about_line() {
        fn walk(cmd: &clap::Command, path: &str) {
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                assert!(sub.get_about().is_some(), "`{name}` has no description");
                walk(sub, &name);
            }
        }
        walk(&Cli::command(), "spate");
    }

    #[test]
    fn parses_a_deploy_and_a_send() {
        let cli = Cli::try_parse_from([
            "spate",
            "plugin",
            "deploy",
            "plugins/order-totals",
            "--component",
            "x.wasm",
            "--no-activate",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Plugin(PluginCommand::Deploy(_))
        ));
        let cli = Cli::try_parse_from([
            "spate", "events", "send", "orders", "--key", "c-1", "--header", "a=b", "{}",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Events(EventsCommand::Send(_))
        ));
    }
}
