//! The `spate` binary. `spate up` wires configuration, telemetry, backends, the runtime
//! and the HTTP API together and waits for a shutdown signal; every other command is a
//! client of that API (see `cli`).

mod cli;

use clap::Parser as _;
use cli::{Cli, Command, GlobalArgs, UpArgs};
use spate::{Config, telemetry};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up(&cli.global, args).await,
        command => cli::run_client(&cli.global, command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn up(global: &GlobalArgs, args: UpArgs) -> anyhow::Result<()> {
    telemetry::init_tracing();
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = &global.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(listen) = args.listen {
        config.api.listen = listen;
    }
    if let Some(token) = &global.token {
        config.api.token = Some(token.clone());
    }
    config.validate()?;

    spate::node::run(config, spate::node::shutdown_signal()).await
}
