//! `spate plugin new` and `spate plugin build`: scaffold a plugin project in Rust, Python
//! or JavaScript from the SDKs' templates, and build one into a component with its
//! language's toolchain. Local commands: they never talk to the API.
//!
//! The templates, the Python and JavaScript SDKs, their build scripts and the WIT package
//! are embedded in the binary from the repository (`sdk/*`, `wit/`), so a `spate` binary
//! builds plugins against exactly the contract its host implements, wherever it runs.
//! The toolchains themselves (cargo, componentize-py, ComponentizeJS) are not embedded:
//! a missing one is reported with how to install it.

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The WIT package the host implements: the one source of the guest bindings too.
const WIT: &str = include_str!("../../../../wit/spate.wit");

/// A file written into a build or a new project: (path relative to its root, contents).
type File = (&'static str, &'static str);

/// The Python SDK and its build script, laid out as in the repository.
const PYTHON_SDK: &[File] = &[
    (
        "sdk/python/build.py",
        include_str!("../../../../sdk/python/build.py"),
    ),
    (
        "sdk/python/requirements-build.txt",
        include_str!("../../../../sdk/python/requirements-build.txt"),
    ),
    (
        "sdk/python/spate/__init__.py",
        include_str!("../../../../sdk/python/spate/__init__.py"),
    ),
];

/// The JavaScript SDK, its build script and the toolchain pins, laid out as in the repository.
const JS_SDK: &[File] = &[
    (
        "sdk/js/build.mjs",
        include_str!("../../../../sdk/js/build.mjs"),
    ),
    (
        "sdk/js/src/index.js",
        include_str!("../../../../sdk/js/src/index.js"),
    ),
    (
        "sdk/js/toolchain/package.json",
        include_str!("../../../../sdk/js/toolchain/package.json"),
    ),
];

const RUST_TEMPLATE: &[File] = &[
    (
        "Cargo.toml",
        include_str!("../../../../sdk/rust/template/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../../sdk/rust/template/src/lib.rs"),
    ),
    (
        "spate.toml",
        include_str!("../../../../sdk/rust/template/spate.toml"),
    ),
    (
        "README.md",
        include_str!("../../../../sdk/rust/template/README.md"),
    ),
    (".gitignore", "/target\n*.wasm\n"),
];

const PYTHON_TEMPLATE: &[File] = &[
    (
        "handler.py",
        include_str!("../../../../sdk/python/template/handler.py"),
    ),
    (
        "spate.toml",
        include_str!("../../../../sdk/python/template/spate.toml"),
    ),
    (
        "README.md",
        include_str!("../../../../sdk/python/template/README.md"),
    ),
    (".gitignore", "*.wasm\n__pycache__/\n"),
];

const JS_TEMPLATE: &[File] = &[
    (
        "handler.js",
        include_str!("../../../../sdk/js/template/handler.js"),
    ),
    (
        "spate.toml",
        include_str!("../../../../sdk/js/template/spate.toml"),
    ),
    (
        "package.json",
        include_str!("../../../../sdk/js/template/package.json"),
    ),
    (
        "README.md",
        include_str!("../../../../sdk/js/template/README.md"),
    ),
    (".gitignore", "*.wasm\nnode_modules/\n"),
];

/// The Rust SDK this binary was built with, for `spate-sdk = { path = ... }` in new
/// Rust projects (override with `--rust-sdk`).
const RUST_SDK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../sdk/rust");

/// Help text after `spate plugin new --help`.
pub const NEW_HELP: &str = "\
Creates DIR (default: ./NAME) with a complete handler that counts events per key, emits the
count to `counts` and starts a `milestone` workflow every 100th event, plus its spate.toml:

  rust     Cargo.toml, src/lib.rs (spate-sdk), spate.toml
  python   handler.py (def handle(event)), spate.toml
  js       handler.js (export function handle(event)), package.json, spate.toml

Examples:
  spate plugin new --lang python order-stats
  spate plugin new --lang js order-stats --dir plugins/order-stats
  spate plugin new --lang rust order-stats --rust-sdk ../spate/sdk/rust
  cd order-stats && spate plugin build && spate plugin deploy";

/// Help text after `spate plugin build --help`.
pub const BUILD_HELP: &str = "\
Builds the plugin in DIR (default: .) into DIR/<name>.wasm, <name> from DIR/spate.toml, which
`spate plugin deploy DIR` then finds. The language is detected from the files (Cargo.toml:
rust; handler.py: python; handler.js: js) unless --lang says.

  rust     cargo build --release --target wasm32-wasip2 (needs the wasm32-wasip2 target:
           rustup target add wasm32-wasip2)
  python   componentize-py (sdk/python/build.py): scripts/guest-toolchains.sh python, or
           pip install componentize-py; about 10 s and an 18 MB component
  js       rolldown + ComponentizeJS (sdk/js/build.mjs): node >= 20 and
           scripts/guest-toolchains.sh js; about 5 s and a 12 MB component

The Python and JavaScript toolchains are looked up in ${SPATE_CACHE_DIR:-~/.cache/spate}/guests
(where scripts/guest-toolchains.sh installs them); the SDKs and the WIT come with this binary.

Examples:
  spate plugin build
  spate plugin build plugins/order-totals-py
  spate plugin build my-plugin --out /tmp/my-plugin.wasm";

/// A plugin's language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust with the `spate-sdk` crate.
    Rust,
    /// Python with componentize-py.
    #[value(alias = "py")]
    Python,
    /// JavaScript with ComponentizeJS.
    #[value(alias = "javascript")]
    Js,
}

impl Lang {
    fn name(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }
}

/// Options of `spate plugin new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// Language of the handler.
    #[arg(long, value_enum)]
    pub lang: Lang,
    /// Plugin name: 1-64 characters of a-z, 0-9 and `-` (also the manifest's `name`).
    pub name: String,
    /// Directory to create [default: ./NAME]. It must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Path of the Rust SDK (`sdk/rust` of a Spate checkout) for `--lang rust`
    /// [default: the one this binary was built from].
    #[arg(long, value_name = "DIR")]
    pub rust_sdk: Option<PathBuf>,
}

/// Options of `spate plugin build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Plugin directory (with spate.toml) [default: .].
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Language [default: detected from the files].
    #[arg(long, value_enum)]
    pub lang: Option<Lang>,
    /// Where to write the component [default: DIR/<name>.wasm].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `spate plugin new`: write the language's template into a new directory.
pub fn new(args: NewArgs) -> anyhow::Result<()> {
    if !spate_core::manifest::valid_name(&args.name) {
        bail!(
            "plugin name `{}` must be 1-64 characters of a-z, 0-9 and `-`, not starting with `-`",
            args.name
        );
    }
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let created = scaffold(args.lang, &args.name, &dir, args.rust_sdk.as_deref())?;
    println!(
        "created {} plugin `{}` in {}:",
        args.lang.name(),
        args.name,
        dir.display()
    );
    for file in created {
        println!("  {file}");
    }
    let shown = dir.display();
    println!(
        "next:\n  spate plugin build {shown}\n  spate up                       # in another terminal\n  spate plugin deploy {shown}\n  spate events send events --key k-1 '{{}}' && spate events tail counts"
    );
    Ok(())
}

/// Write the template of `lang` for plugin `name` into `dir`; returns the files written.
pub fn scaffold(
    lang: Lang,
    name: &str,
    dir: &Path,
    rust_sdk: Option<&Path>,
) -> anyhow::Result<Vec<&'static str>> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} already exists and is not empty; choose another --dir",
            dir.display()
        );
    }
    let rust_sdk = match lang {
        Lang::Rust => {
            let sdk = rust_sdk.map_or_else(|| PathBuf::from(RUST_SDK_DIR), Path::to_path_buf);
            let sdk = sdk.canonicalize().with_context(|| {
                format!(
                    "the Rust SDK is not at {}; pass --rust-sdk DIR (sdk/rust of a Spate checkout)",
                    sdk.display()
                )
            })?;
            if !sdk.join("Cargo.toml").is_file() {
                bail!(
                    "{} is not the Rust SDK (no Cargo.toml); pass --rust-sdk DIR",
                    sdk.display()
                );
            }
            sdk.display().to_string()
        }
        _ => String::new(),
    };
    let template = match lang {
        Lang::Rust => RUST_TEMPLATE,
        Lang::Python => PYTHON_TEMPLATE,
        Lang::Js => JS_TEMPLATE,
    };
    let mut written = Vec::new();
    for (path, text) in template {
        let text = text
            .replace("{{name}}", name)
            .replace("{{rust_sdk}}", &rust_sdk.replace('\\', "/"));
        write_file(&dir.join(path), &text)?;
        written.push(*path);
    }
    Ok(written)
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `spate plugin build`: build the plugin in a directory into `<dir>/<name>.wasm`.
pub fn build(args: BuildArgs) -> anyhow::Result<()> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from("."));
    let out = build_plugin(&dir, args.lang, args.out.as_deref())?;
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "built {} ({:.1} MB); deploy it with `spate plugin deploy {}`",
        out.display(),
        size as f64 / 1e6,
        dir.display()
    );
    Ok(())
}

/// Build the plugin in `dir`; returns the component's path.
pub fn build_plugin(dir: &Path, lang: Option<Lang>, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let manifest_path = dir.join("spate.toml");
    let manifest = std::fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "reading {} (a plugin directory has a spate.toml; create one with `spate plugin new`)",
            manifest_path.display()
        )
    })?;
    let name = toml::from_str::<toml::Table>(&manifest)
        .with_context(|| format!("parsing {}", manifest_path.display()))?
        .get("name")
        .and_then(|n| n.as_str())
        .map(str::to_string)
        .with_context(|| format!("{} has no `name`", manifest_path.display()))?;
    let lang = match lang {
        Some(l) => l,
        None => detect(dir)?,
    };
    let out = match out {
        Some(o) => std::path::absolute(o)?,
        None => std::path::absolute(dir.join(format!("{name}.wasm")))?,
    };
    match lang {
        Lang::Rust => build_rust(dir, &out)?,
        Lang::Python => build_guest(
            lang,
            PYTHON_SDK,
            "python3",
            "sdk/python/build.py",
            &dir.join("handler.py"),
            &out,
        )?,
        Lang::Js => build_guest(
            lang,
            JS_SDK,
            "node",
            "sdk/js/build.mjs",
            &dir.join("handler.js"),
            &out,
        )?,
    }
    Ok(out)
}

/// The language of the project in `dir`, from its files.
fn detect(dir: &Path) -> anyhow::Result<Lang> {
    let found: Vec<Lang> = [
        ("Cargo.toml", Lang::Rust),
        ("handler.py", Lang::Python),
        ("handler.js", Lang::Js),
    ]
    .into_iter()
    .filter(|(file, _)| dir.join(file).is_file())
    .map(|(_, lang)| lang)
    .collect();
    match found.as_slice() {
        [lang] => Ok(*lang),
        [] => bail!(
            "cannot tell the language of {}: it has no Cargo.toml, handler.py or handler.js \
             (create a project with `spate plugin new`, or pass --lang)",
            dir.display()
        ),
        _ => bail!(
            "{} has files of several languages ({}); pass --lang",
            dir.display(),
            found
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn build_rust(dir: &Path, out: &Path) -> anyhow::Result<()> {
    const TARGET: &str = "wasm32-wasip2";
    let cargo_toml = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&cargo_toml)
        .with_context(|| format!("reading {}", cargo_toml.display()))?;
    let crate_name = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| {
            t.get("package")
                .and_then(|p| p.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_string)
        })
        .with_context(|| format!("{} has no [package] name", cargo_toml.display()))?;
    let status = Command::new("cargo")
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(&cargo_toml)
        .status()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run cargo ({e}); install Rust with rustup (https://rustup.rs), then \
                 `rustup target add {TARGET}`"
            )
        })?;
    if !status.success() {
        bail!(
            "cargo build failed ({status}); its output above says why. If it says `can't find \
             crate for core`, install the target: rustup target add {TARGET}"
        );
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("target"));
    let built = target_dir
        .join(TARGET)
        .join("release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    std::fs::copy(&built, out)
        .with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
    Ok(())
}

/// Lay the embedded SDK and WIT out in a temporary directory and run its build script.
fn build_guest(
    lang: Lang,
    sdk: &[File],
    interpreter: &str,
    script: &str,
    handler: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    if !handler.is_file() {
        bail!("no handler at {}", handler.display());
    }
    let work = BuildDir::new()?;
    write_file(&work.0.join("wit/spate.wit"), WIT)?;
    for (path, text) in sdk {
        write_file(&work.0.join(path), text)?;
    }
    let status = Command::new(interpreter)
        .arg(work.0.join(script))
        .arg(std::path::absolute(handler)?)
        .arg(out)
        .status();
    let install = format!("scripts/guest-toolchains.sh {}", lang.name());
    let status = match status {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`{interpreter}` is not installed, and building {} plugins needs it: install {} \
             (e.g. apt-get install {}), then the toolchain with `{install}` from the Spate repository",
            lang.name(),
            if lang == Lang::Python {
                "Python >= 3.9"
            } else {
                "Node.js >= 20 with npm"
            },
            if lang == Lang::Python {
                "python3 python3-venv"
            } else {
                "nodejs npm"
            },
        ),
        Err(e) => bail!("cannot run {interpreter}: {e}"),
    };
    match status.code() {
        Some(0) => Ok(()),
        Some(127) => bail!(
            "the {} toolchain is missing (see above); install it with `{install}` from the Spate repository",
            lang.name()
        ),
        _ => bail!(
            "building {} failed ({status}); the output above says why",
            handler.display()
        ),
    }
}

/// A temporary directory, removed when dropped.
struct BuildDir(PathBuf);

impl BuildDir {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("spate-build-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn every_template_scaffolds_a_project_with_its_name() {
        let root = tempfile::tempdir().unwrap();
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            let dir = root.path().join(lang.name());
            let files = scaffold(lang, "order-stats", &dir, None).unwrap();
            assert!(files.contains(&"spate.toml"));
            let manifest = std::fs::read_to_string(dir.join("spate.toml")).unwrap();
            let parsed = spate_core::Manifest::parse(
                &manifest,
                &spate_core::manifest::LimitCeilings::default(),
            )
            .unwrap();
            assert_eq!(parsed.name, "order-stats");
            assert_eq!(detect(&dir).unwrap(), lang);
            for file in files {
                let text = std::fs::read_to_string(dir.join(file)).unwrap();
                assert!(!text.contains("{{"), "{file} has an unreplaced placeholder");
            }
        }
        let cargo = std::fs::read_to_string(root.path().join("rust/Cargo.toml")).unwrap();
        assert!(cargo.contains("name = \"order-stats\""));
        assert!(cargo.contains("sdk/rust\" }"), "{cargo}");
    }

    #[test]
    fn refuses_bad_names_and_non_empty_directories() {
        let root = tempfile::tempdir().unwrap();
        let err = new(NewArgs {
            lang: Lang::Python,
            name: "Order_Stats".into(),
            dir: Some(root.path().join("x")),
            rust_sdk: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("a-z, 0-9"), "{err}");
        std::fs::write(root.path().join("file"), "x").unwrap();
        let err = scaffold(Lang::Js, "x", root.path(), None).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
    }

    #[test]
    fn a_directory_without_a_handler_says_what_is_missing() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("spate.toml"), "name = \"x\"\n").unwrap();
        let err = build_plugin(root.path(), None, None).unwrap_err();
        assert!(err.to_string().contains("spate plugin new"), "{err}");
    }

    /// The Python and JavaScript templates build into components with the toolchains that
    /// `scripts/guest-toolchains.sh` installs (the test command installs them; without
    /// them this fails saying so).
    #[test]
    fn the_python_and_javascript_templates_build_into_components() {
        let root = tempfile::tempdir().unwrap();
        for lang in [Lang::Python, Lang::Js] {
            let dir = root.path().join(lang.name());
            scaffold(lang, "template-check", &dir, None).unwrap();
            let out = build_plugin(&dir, None, None)
                .unwrap_or_else(|e| panic!("building the {} template: {e:#}", lang.name()));
            assert_eq!(
                out,
                std::path::absolute(dir.join("template-check.wasm")).unwrap()
            );
            let bytes = std::fs::read(&out).unwrap();
            // Component binaries carry layer 1 (`0d 00 01 00`).
            assert_eq!(
                bytes.get(..8),
                Some(&b"\0asm\x0d\x00\x01\x00"[..]),
                "{}",
                lang.name()
            );
        }
    }
}
