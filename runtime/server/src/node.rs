//! `spate up` as a library call: bind the API, open the backends, start the runtime,
//! serve until a shutdown signal, then drain in-flight events and commit. The `spate`
//! binary and the end-to-end tests' child processes both run exactly this.

use crate::api::{self, ApiState};
use crate::{Backends, Config, Runtime, telemetry};
use anyhow::Context as _;
use std::sync::Arc;

/// Run a runtime and its HTTP API with `config` until `shutdown` completes; then stop the
/// API, drain in-flight events, commit, and return. A second signal (see
/// [`shutdown_signal`]) during the drain exits the process at once.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = telemetry::metrics();
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
    let backends = Backends::from_config(&config).await?;
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
    api::serve(listener, state, shutdown)
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
pub async fn shutdown_signal() {
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
