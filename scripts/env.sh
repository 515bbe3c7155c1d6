# Shared settings of the project scripts (sourced, not run).
# Slow builds and tool installs are cached outside the clone, so a fresh clone on the same
# machine (CI clones afresh every run) skips them; a new machine only runs slower.
export SPATE_CACHE_DIR="${SPATE_CACHE_DIR:-$HOME/.cache/spate}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SPATE_CACHE_DIR/target}"
export SPATE_PLUGINS_TARGET_DIR="${SPATE_PLUGINS_TARGET_DIR:-$SPATE_CACHE_DIR/plugins-target}"
mkdir -p "$SPATE_CACHE_DIR"

# Everything the build and tests need that a fresh machine may lack: the pinned toolchain
# with the wasm32-wasip2 target (rust-toolchain.toml asks rustup for it), a C compiler, and
# Debian's redis-server for the Redis tests.
spate_setup() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
        return 1
    fi
    if command -v rustup >/dev/null 2>&1; then
        local tc
        tc=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
        rustup toolchain list | grep -q "^$tc" || rustup toolchain install "$tc" --profile minimal
        rustup target list --installed --toolchain "$tc" | grep -q '^wasm32-wasip2$' \
            || rustup target add --toolchain "$tc" wasm32-wasip2
        rustup component list --installed --toolchain "$tc" | grep -q '^clippy' \
            || rustup component add --toolchain "$tc" clippy rustfmt
    fi
    if ! command -v cc >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && apt-get install -y -qq build-essential
        else
            echo "error: a C compiler (cc) is needed; install build-essential" >&2
            return 1
        fi
    fi
    # The Redis backend tests start their own redis-server on free loopback ports (never a
    # system one); they only need the binary.
    if ! command -v redis-server >/dev/null 2>&1 && [ -z "${SPATE_REDIS_SERVER:-}" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && apt-get install -y -qq redis-server
        else
            # Only the tests need it (and they fail saying so); the demo and bench do not.
            echo "warning: redis-server not found; the tests need it: sudo apt-get install" \
                "redis-server (or set SPATE_REDIS_SERVER)" >&2
        fi
    fi
}
