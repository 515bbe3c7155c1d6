//! The `spate` binary. `spate up` wires configuration, telemetry, backends, the runtime
//! and the HTTP API together and waits for a shutdown signal; every other command is a
//! client of that API (see `cli`).

mod cli;

use anyhow::Context as _;
use clap::Parser as _;
use cli::{Cli, Command, GlobalArgs, UpArgs};
use spate::api::{self, ApiState};
use spate::{Backends, Config, Runtime, telemetry};
use std::process::ExitCode;
use std::sync::Arc;

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
    let metrics = telemetry::metrics();

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

    // Bind first: a taken port should fail before the data directory is opened.
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (another `spate up` running? choose another with --listen)",
                config.api.listen
            )
        })?;
    let token = api::resolve_token(&config)?;
    let backends = Backends::from_config(&config)?;
    let runtime = Runtime::start(config.clone(), backends)
        .await
        .context("starting the runtime")?;

    let data_dir = std::fs::canonicalize(&config.data_dir).unwrap_or(config.data_dir.clone());
    let token_note = if config.api.token.is_some() {
        "from configuration (api.token / SPATE_API_TOKEN)".to_string()
    } else {
        format!(
            "{} (the CLI reads it from there)",
            data_dir.join(api::TOKEN_FILE).display()
        )
    };
    println!("spate {} is up", env!("CARGO_PKG_VERSION"));
    println!(
        "  API        http://{}",
        listener.local_addr().unwrap_or(config.api.listen)
    );
    println!("  data dir   {}", data_dir.display());
    println!("  API token  {token_note}");
    println!(
        "  metrics    http://{}/metrics",
        listener.local_addr().unwrap_or(config.api.listen)
    );
    println!("Ctrl-C stops it after in-flight events finish. Next: `spate plugin deploy --help`.");

    let state = ApiState::new(Arc::clone(&runtime), token, metrics);
    api::serve(listener, state, shutdown_signal())
        .await
        .context("serving the HTTP API")?;

    tracing::info!("HTTP API stopped; draining in-flight events");
    // A second signal during the drain exits at once; uncommitted events are redelivered.
    tokio::spawn(async {
        shutdown_signal().await;
        eprintln!("second signal: exiting without waiting for in-flight events");
        std::process::exit(130);
    });
    runtime.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on Ctrl-C or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
