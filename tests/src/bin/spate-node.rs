//! A `spate up` for the end-to-end tests' child processes, so a test can SIGKILL or SIGTERM
//! a real runtime process and start it again on the same data directory.
//!
//! Usage: `spate-node DATA_DIR LISTEN_ADDR [CONFIG_FILE]`. Embedded defaults (or the
//! file's settings), `SPATE_*` variables on top, the token from `SPATE_API_TOKEN`, a short
//! commit interval. Runs `spate::node::run`, exactly what `spate up` runs.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(listen)) = (args.next(), args.next()) else {
        eprintln!("usage: spate-node DATA_DIR LISTEN_ADDR");
        return ExitCode::from(2);
    };
    let file = args.next().map(std::path::PathBuf::from);
    let mut config = match spate::Config::load(file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    config.data_dir = dir.into();
    config.dispatch.commit_interval_ms = 20;
    config.sandbox.pool_instances = 128;
    match listen.parse() {
        Ok(addr) => config.api.listen = addr,
        Err(e) => {
            eprintln!("error: bad listen address {listen}: {e}");
            return ExitCode::from(2);
        }
    }
    spate::telemetry::init_tracing();
    match spate::node::run(config, spate::node::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
