# Shared settings of the project scripts (sourced, not run).
# Slow builds and tool installs are cached outside the clone, so a fresh clone on the same
# machine (CI clones afresh every run) skips them; a new machine only runs slower.
export SPATE_CACHE_DIR="${SPATE_CACHE_DIR:-$HOME/.cache/spate}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SPATE_CACHE_DIR/target}"
export SPATE_PLUGINS_TARGET_DIR="${SPATE_PLUGINS_TARGET_DIR:-$SPATE_CACHE_DIR/plugins-target}"
mkdir -p "$SPATE_CACHE_DIR"
# Incremental state is several GB per build and buys nothing for a fresh clone's build.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The cached target directory keeps every earlier build's test and binary executables
# (hundreds of MB each with debug info); drop those not written in the last two hours,
# and incremental state, before building. Libraries stay, so nothing slow is rebuilt.
spate_prune_target() {
    local t="$CARGO_TARGET_DIR"
    [ -d "$t" ] || return 0
    rm -rf "$t"/debug/incremental "$t"/release/incremental
    local d
    for d in "$t"/debug/deps "$t"/release/deps; do
        [ -d "$d" ] || continue
        find "$d" -maxdepth 1 -type f -perm -u+x ! -name '*.so' ! -name '*.rlib' \
            ! -name '*.rmeta' ! -name '*.d' -size +20M -mmin +120 -delete 2>/dev/null || true
    done
}
# The Kafka-protocol broker the Kafka tests start (runtime/conformance/src/kafka.rs looks
# here first); spate_install_tansu builds it into the cache once.
export SPATE_TANSU_VERSION=0.6.0
export SPATE_TANSU="${SPATE_TANSU:-$SPATE_CACHE_DIR/tools/bin/tansu}"

# Everything the build and tests need that a fresh machine may lack: the pinned toolchain
# with the wasm32-wasip2 target (rust-toolchain.toml asks rustup for it), a C compiler, and
# Debian's redis-server for the Redis tests.
spate_setup() {
    spate_prune_target
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
    # librdkafka is built with TLS against the system OpenSSL.
    if ! { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; }; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && apt-get install -y -qq pkg-config libssl-dev
        else
            echo "error: OpenSSL headers are needed (librdkafka's TLS): install pkg-config" \
                "and libssl-dev" >&2
            return 1
        fi
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
    spate_install_tansu
}

# Whether $1 is tansu at the pinned version.
spate_tansu_ok() {
    [ -x "$1" ] && [ "$("$1" --version 2>/dev/null)" = "tansu $SPATE_TANSU_VERSION" ]
}

# Makes $SPATE_CACHE_DIR/tools/bin/tansu exist at $SPATE_TANSU_VERSION: the broker the Kafka
# tests run, built from crates.io with only the memory/object-store engine. The build takes
# about 25 minutes on two cores, once per machine: it uses a target directory of its own
# (deleted afterwards), not the project's, and a lock so concurrent runs build it once. A
# SPATE_TANSU pointing elsewhere at the pinned version is used as it is.
spate_install_tansu() {
    local tools="$SPATE_CACHE_DIR/tools"
    local bin="$tools/bin/tansu"
    if [ "$SPATE_TANSU" != "$bin" ] && spate_tansu_ok "$SPATE_TANSU"; then
        return 0
    fi
    spate_tansu_ok "$bin" && return 0
    mkdir -p "$tools"
    (
        set -o pipefail
        if command -v flock >/dev/null 2>&1; then
            flock 9
        fi
        # Another run may have built it while this one waited for the lock.
        spate_tansu_ok "$bin" && exit 0
        echo "installing tansu $SPATE_TANSU_VERSION (the Kafka broker of the tests) into" \
            "$tools: this takes about 25 minutes, once" >&2
        local build="$SPATE_CACHE_DIR/tansu-build" log="$SPATE_CACHE_DIR/tansu-build.log"
        local args=(install tansu --version "$SPATE_TANSU_VERSION" --no-default-features
            --features dynostore --force --root "$tools")
        # --force: a binary at another version is replaced, not kept.
        if ! CARGO_TARGET_DIR="$build" cargo "${args[@]}" --locked 2>&1 | tee "$log" >&2; then
            # Retry without the published lock file only if resolving it failed (nothing
            # compiled); a failed compile would only fail again.
            if grep -q '^ *Compiling ' "$log"; then
                echo "error: building tansu failed (log: $log)" >&2
                exit 1
            fi
            echo "cargo install --locked could not resolve; retrying without --locked" >&2
            CARGO_TARGET_DIR="$build" cargo "${args[@]}" 2>&1 | tee "$log" >&2 || {
                echo "error: building tansu failed (log: $log)" >&2
                exit 1
            }
        fi
        spate_tansu_ok "$bin" || {
            echo "error: $bin is not tansu $SPATE_TANSU_VERSION after installing" >&2
            exit 1
        }
        rm -rf "$build" "$log"
    ) 9>"$SPATE_CACHE_DIR/tools.lock"
}
