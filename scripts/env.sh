# Shared settings of the project scripts (sourced, not run).
# Slow builds and tool installs are cached outside the clone, so a fresh clone on the same
# machine (CI clones afresh every run) skips them; a new machine only runs slower.
export SPATE_CACHE_DIR="${SPATE_CACHE_DIR:-$HOME/.cache/spate}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SPATE_CACHE_DIR/target}"
export SPATE_PLUGINS_TARGET_DIR="${SPATE_PLUGINS_TARGET_DIR:-$SPATE_CACHE_DIR/plugins-target}"
mkdir -p "$SPATE_CACHE_DIR"

# Everything the build needs that a fresh machine may lack: the pinned toolchain with the
# wasm32-wasip2 target (rust-toolchain.toml asks rustup for it), and a C compiler.
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
}
