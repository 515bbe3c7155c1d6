#!/usr/bin/env node
// Build a Spate handler written in JavaScript into a WebAssembly component.
//
//     node sdk/js/build.mjs HANDLER.js OUT.wasm
//
// HANDLER.js is an ES module exporting `handle(event)` (see README.md); it imports the SDK
// as "spate" and may import relative modules and packages from a node_modules/ beside it.
// The build bundles it with the SDK (rolldown), then ComponentizeJS generates the bindings
// from the WIT package (the repository's wit/, or $SPATE_WIT_DIR) and embeds the bundle in
// the StarlingMonkey engine: one component of about 12 MB.
//
// The toolchain is looked up in $SPATE_JS_TOOLCHAIN (a directory with node_modules/), else
// ${SPATE_CACHE_DIR:-~/.cache/spate}/guests/js, which `scripts/guest-toolchains.sh js`
// installs at the versions pinned in sdk/js/toolchain/package-lock.json.

import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const WORLD = "event-handler";
// WASI features ComponentizeJS can leave out: no outgoing HTTP (`fetch`) and no
// incoming-HTTP handler. stdio (errors to stderr), clocks and random stay: the host links
// them, and stderr carries an uncaught exception's stack into the dead-letter reason.
const DISABLED_FEATURES = ["http", "fetch-event"];

function fail(message, code = 1) {
  console.error(`error: ${message}`);
  process.exit(code);
}

function toolchainDir() {
  if (process.env.SPATE_JS_TOOLCHAIN) return process.env.SPATE_JS_TOOLCHAIN;
  const guests =
    process.env.SPATE_GUESTS_DIR ||
    join(process.env.SPATE_CACHE_DIR || join(homedir(), ".cache", "spate"), "guests");
  return join(guests, "js");
}

/** Import package `name` from the toolchain's node_modules through its ESM entry point. */
async function importTool(dir, name) {
  const pkgDir = join(dir, "node_modules", name);
  const pkgFile = join(pkgDir, "package.json");
  if (!existsSync(pkgFile)) {
    let pins = "";
    try {
      const deps = JSON.parse(readFileSync(join(HERE, "toolchain", "package.json"), "utf8")).dependencies;
      pins = Object.entries(deps).map(([n, v]) => `${n}@${v}`).join(" ");
    } catch {
      pins = "@bytecodealliance/componentize-js rolldown";
    }
    fail(
      `${name} is not installed in ${dir}.\n` +
        "Install the JavaScript toolchain with `scripts/guest-toolchains.sh js` from the Spate " +
        "repository (node >= 20 and npm), or with\n" +
        `  npm install --prefix ${dir} ${pins}\n` +
        "or point SPATE_JS_TOOLCHAIN at a directory where it is installed.",
      127,
    );
  }
  const pkg = JSON.parse(readFileSync(pkgFile, "utf8"));
  let entry = pkg.exports?.["."] ?? pkg.exports ?? pkg.module ?? pkg.main;
  if (entry && typeof entry === "object") entry = entry.import ?? entry.default;
  if (typeof entry !== "string") fail(`cannot find the ES module entry of ${name} in ${pkgFile}`);
  return import(pathToFileURL(join(pkgDir, entry)).href);
}

async function main(args) {
  if (args.length !== 2 || args[0] === "-h" || args[0] === "--help") {
    console.error("usage: node sdk/js/build.mjs HANDLER.js OUT.wasm");
    process.exit(args[0] === "-h" || args[0] === "--help" ? 0 : 2);
  }
  const handler = resolve(args[0]);
  const out = resolve(args[1]);
  if (!existsSync(handler)) fail(`no handler file at ${handler}`);
  const wit = process.env.SPATE_WIT_DIR || join(HERE, "..", "..", "wit");
  if (!existsSync(join(wit, "spate.wit"))) {
    fail(`no WIT package at ${wit} (set SPATE_WIT_DIR to the directory holding spate.wit)`);
  }
  const dir = toolchainDir();
  const { rolldown } = await importTool(dir, "rolldown");
  const { componentize } = await importTool(dir, "@bytecodealliance/componentize-js");

  const work = mkdtempSync(join(tmpdir(), "spate-js-build-"));
  try {
    // The entry wraps the plugin's `handle` as the `spate:plugin/handler` export.
    const entry = join(work, "entry.js");
    writeFileSync(
      entry,
      `import * as plugin from ${JSON.stringify(handler)};\n` +
        `import { exportHandler } from "spate";\n` +
        `export const handler = exportHandler(plugin.handle);\n`,
    );
    const bundle = await rolldown({
      input: entry,
      // WIT imports stay imports: ComponentizeJS binds them to the host.
      external: [/^spate:plugin\//, /^wasi:/],
      resolve: { alias: { spate: join(HERE, "src", "index.js") } },
      platform: "neutral",
      logLevel: "warn",
    });
    const bundled = join(work, "bundle.js");
    await bundle.write({ file: bundled, format: "esm" });
    await bundle.close();

    const { component } = await componentize({
      sourcePath: bundled,
      witPath: wit,
      worldName: WORLD,
      disableFeatures: DISABLED_FEATURES,
    });
    writeFileSync(out, component);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  console.error(`built ${out} (${statSync(out).size} bytes) from ${handler}`);
}

main(process.argv.slice(2)).catch((e) => fail(e?.stack ?? String(e)));
