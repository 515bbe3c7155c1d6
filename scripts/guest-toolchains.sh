#!/usr/bin/env bash
# Installs the toolchains that build Python and JavaScript handlers into components, at
# the versions pinned in the repository, into a cache outside the clone:
#
#   python  componentize-py (sdk/python/requirements-build.txt), in a venv at
#           $SPATE_GUESTS_DIR/python   (needs python3 >= 3.9 with venv)
#   js      @bytecodealliance/componentize-js, jco, wizer and rolldown
#           (sdk/js/toolchain/package-lock.json), via `npm ci` into
#           $SPATE_GUESTS_DIR/js       (needs node >= 20 and npm)
#
# SPATE_GUESTS_DIR defaults to ${SPATE_CACHE_DIR:-~/.cache/spate}/guests. Idempotent: each
# install records the hash of its pin file and is skipped while that matches, so a second
# run returns at once; a changed pin reinstalls. `spate plugin build`, sdk/*/build.* and
# tests/build.rs look for the tools there.
#
#   scripts/guest-toolchains.sh            # python and js
#   scripts/guest-toolchains.sh python     # one
#   scripts/guest-toolchains.sh c          # opt-in: the C toolchain of plugins/counter-c
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SPATE_CACHE_DIR:-$HOME/.cache/spate}
guests=${SPATE_GUESTS_DIR:-$cache/guests}
mkdir -p "$guests"

say() { echo "guest-toolchains: $*" >&2; }
die() { say "error: $*"; exit 1; }

stamp_of() { sha256sum "$@" | sha256sum | cut -c1-16; }

# Run "$@" holding a lock on $guests/.lock, so concurrent runs (two test builds) install once.
locked() {
    if command -v flock >/dev/null 2>&1; then
        (flock 9; "$@") 9>"$guests/.lock"
    else
        "$@"
    fi
}

install_python() {
    local dir=$guests/python pins=$repo/sdk/python/requirements-build.txt
    local want
    want=$(stamp_of "$pins")
    if [ "$(cat "$dir/.spate-stamp" 2>/dev/null)" = "$want" ] && [ -x "$dir/bin/componentize-py" ]; then
        say "python: cached in $dir ($("$dir/bin/componentize-py" --version))"
        return
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is needed for the Python toolchain (apt-get install python3 python3-venv)"
    python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 9))' 2>/dev/null \
        || die "python3 >= 3.9 with the venv module is needed (apt-get install python3-venv)"
    say "python: installing $(grep -v '^#' "$pins" | tr '\n' ' ')into $dir"
    local start=$SECONDS
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --disable-pip-version-check --no-input -q -r "$pins"
    "$dir/bin/componentize-py" --version >/dev/null
    echo "$want" >"$dir/.spate-stamp"
    say "python: installed in $((SECONDS - start)) s ($("$dir/bin/componentize-py" --version))"
}

install_js() {
    local dir=$guests/js src=$repo/sdk/js/toolchain
    local want
    want=$(stamp_of "$src/package.json" "$src/package-lock.json")
    if [ "$(cat "$dir/.spate-stamp" 2>/dev/null)" = "$want" ] \
        && [ -f "$dir/node_modules/@bytecodealliance/componentize-js/package.json" ]; then
        say "js: cached in $dir (componentize-js $(node -p "require('$dir/node_modules/@bytecodealliance/componentize-js/package.json').version" 2>/dev/null || echo '?'))"
        return
    fi
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
        || die "node >= 20 and npm are needed for the JavaScript toolchain (apt-get install nodejs npm)"
    node -e 'process.exit(+process.versions.node.split(".")[0] < 20 ? 1 : 0)' \
        || die "node >= 20 is needed for the JavaScript toolchain (found $(node --version))"
    say "js: installing componentize-js, jco, wizer and rolldown (sdk/js/toolchain/package-lock.json) into $dir"
    local start=$SECONDS
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$src/package.json" "$src/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$want" >"$dir/.spate-stamp"
    say "js: installed in $((SECONDS - start)) s"
}

# Opt-in (not installed by scripts/test): what plugins/counter-c/build.sh needs. Debian's
# clang, lld and wasi-libc (apt, as root), and wit-bindgen-cli and wasm-tools from crates.io
# into $SPATE_GUESTS_DIR/c/bin (several minutes to build once). The WASI preview1 adapter
# comes from the crates.io crate wasi-preview1-component-adapter-provider (cargo fetch).
install_c() {
    local dir=$guests/c
    if ! command -v clang >/dev/null 2>&1 || [ ! -f /usr/lib/wasm32-wasi/libc.a ]; then
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
            || die "install clang lld wasi-libc libclang-rt-14-dev-wasm32 (Debian packages)"
        apt-get install -y -qq clang lld wasi-libc libclang-rt-14-dev-wasm32 >/dev/null
    fi
    [ -x "$dir/bin/wasm-tools" ] || cargo install -q --locked --root "$dir" wasm-tools --version 1.243.0
    [ -x "$dir/bin/wit-bindgen" ] || cargo install -q --locked --root "$dir" wit-bindgen-cli --version 0.61.0
    local fetch=$dir/adapter
    mkdir -p "$fetch/src"
    printf '[package]\nname = "adapter-fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nwasi-preview1-component-adapter-provider = "=48.0.8"\n' >"$fetch/Cargo.toml"
    : >"$fetch/src/lib.rs"
    cargo fetch -q --manifest-path "$fetch/Cargo.toml"
    say "c: ready; put $dir/bin on PATH for plugins/counter-c/build.sh"
}

langs=("$@")
[ ${#langs[@]} -gt 0 ] || langs=(python js)
for lang in "${langs[@]}"; do
    case $lang in
        python | py) locked install_python ;;
        js | javascript) locked install_js ;;
        c) locked install_c ;;
        *) die "unknown toolchain \`$lang\` (python, js, c)" ;;
    esac
done
