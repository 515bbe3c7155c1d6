#!/usr/bin/env bash
# Build handler.c into a Spate component:  plugins/counter-c/build.sh [OUT.wasm]
#
#   1. wit-bindgen c: C bindings from wit/ (the one contract), into a temporary directory;
#   2. Debian's clang + lld + wasi-libc: a wasm32-wasi (preview1) reactor core module;
#   3. wasm-tools component new with the WASI preview1 adapter: the component.
#
# Needs: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32;
#        cargo install wit-bindgen-cli --version 0.61.0; cargo install wasm-tools --version 1.243.0;
#        the adapter wasi_snapshot_preview1.reactor.wasm from the crates.io crate
#        wasi-preview1-component-adapter-provider (same version as wasmtime), found in
#        ~/.cargo/registry after `cargo fetch`, or given as $SPATE_WASI_ADAPTER.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$here/counter-c.wasm}
export PATH="${SPATE_GUESTS_DIR:-${SPATE_CACHE_DIR:-$HOME/.cache/spate}/guests}/c/bin:$PATH"
for tool in clang wit-bindgen wasm-tools; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found; see the comment at the top of $0" >&2; exit 127; }
done
adapter=${SPATE_WASI_ADAPTER:-$(ls -1d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/wasi-preview1-component-adapter-provider-48.*/artefacts/wasi_snapshot_preview1.reactor.wasm 2>/dev/null | tail -n 1)}
[ -f "$adapter" ] || { echo "error: the WASI preview1 reactor adapter was not found; see the comment at the top of $0" >&2; exit 127; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wit-bindgen c "$repo/wit" --world event-handler --out-dir "$work" >/dev/null
clang --target=wasm32-wasi --sysroot=/usr -mexec-model=reactor -Os -Wall -Werror \
    -I"$work" -o "$work/core.wasm" \
    "$here/handler.c" "$work/event_handler.c" "$work/event_handler_component_type.o"
wasm-tools component new "$work/core.wasm" --adapt "wasi_snapshot_preview1=$adapter" -o "$out"
echo "built $out ($(stat -c %s "$out") bytes)" >&2
