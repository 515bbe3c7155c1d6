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
# Everything a build needs that a fresh machine may lack: the pinned toolchain with the
# wasm32-wasip2 target (rust-toolchain.toml asks rustup for it), a C compiler, and the
# OpenSSL headers librdkafka's TLS builds against. The demo needs only this; the tests also
# need spate_setup_tests.
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
}

# What the tests run besides the build: Debian's redis-server, and a JDK 17+ with Maven to
# fetch and run Apache Kafka and Apache Cassandra from Maven Central (scripts/jvm-services,
# cached under $SPATE_CACHE_DIR/jvm). The tests start every service themselves on free
# loopback ports; nothing here starts one.
spate_setup_tests() {
    # The Redis backend tests start their own redis-server (never a system one); they only
    # need the binary.
    if ! command -v redis-server >/dev/null 2>&1 && [ -z "${SPATE_REDIS_SERVER:-}" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && apt-get install -y -qq redis-server
        else
            echo "error: the Redis tests need redis-server: sudo apt-get install" \
                "redis-server (or set SPATE_REDIS_SERVER to a binary)" >&2
            return 1
        fi
    fi
    # Checks java (17+) and mvn, saying what to install when either is missing.
    "$(dirname "${BASH_SOURCE[0]}")/jvm-services" all
}
