//! `spate plugin ...`: deploy a manifest and component, list, show, activate, roll back
//! and remove plugins (the API's bodies are `spate::api::plugins`'s types).

use super::PluginCommand;
use super::client::ApiClient;
use anyhow::Context as _;
use clap::Args;
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use spate::api::plugins::{
    ActivateBody, Activated, PluginList, PluginShow, Promoted, ShadowReport, UploadOutcome,
};
use std::path::{Path, PathBuf};

/// Help text after `spate plugin deploy --help`.
pub const DEPLOY_HELP: &str = "\
PATH is a plugin directory (its spate.toml is the manifest) or a manifest file; without it,
./spate.toml. Without --component, the component is looked for as <manifest dir>/<name>.wasm
and as target/wasm32-wasip2/{release,debug}/<name_with_underscores>.wasm in the manifest's
directory and the directories above it (the newest found wins).

The new version is validated and compiled before it takes traffic; events already running
finish on the version they started with. Re-deploying the same version with the same
component and manifest changes nothing.

Examples:
  cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
  spate plugin deploy plugins/order-totals
  spate plugin deploy plugins/order-totals/spate.toml --component order_totals.wasm
  spate plugin deploy --manifest spate.toml --component plugin.wasm --no-activate
  spate plugin deploy plugins/order-totals --shadow     # compare before it takes over";

/// Help text after `spate plugin shadow --help`.
pub const SHADOW_HELP: &str = "\
A shadow candidate (`spate plugin deploy --shadow`) runs on the events the active version
handles, at the same positions, with nothing applied, emitted or committed; it is served
the values the active call read, so a difference is the code's. It takes at most
dispatch.shadow-cpu-share of one core (events over it are skipped, never delayed). The
report is this runtime's since the candidate started; `spate plugin promote` makes the
candidate active, `--stop` ends the comparison.

Examples:
  spate plugin shadow order-totals
  spate plugin shadow order-totals --json | jq '.divergences[0].diff'
  spate plugin shadow order-totals --stop";

/// Options of `spate plugin deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Plugin directory or manifest file [default: ./spate.toml].
    #[arg(value_name = "PATH", conflicts_with = "manifest")]
    pub path: Option<PathBuf>,
    /// Manifest file (the same as giving it as PATH).
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Compiled component (.wasm) [default: looked up from the manifest's name].
    #[arg(long, value_name = "FILE")]
    pub component: Option<PathBuf>,
    /// Store the version without making it active (activate later with `spate plugin activate`).
    #[arg(long)]
    pub no_activate: bool,
    /// Run the version beside the active one as a shadow candidate: compared event by
    /// event, never applied (`spate plugin shadow`, `spate plugin promote`).
    #[arg(long, conflicts_with = "no_activate")]
    pub shadow: bool,
}

/// Run a `spate plugin` command.
pub async fn run(client: &ApiClient, cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Deploy(args) => deploy(client, args).await,
        PluginCommand::Ls => list(client).await,
        PluginCommand::Show { name } => {
            let shown: PluginShow = client
                .typed(client.request(Method::GET, &format!("/v1/plugins/{name}")))
                .await?;
            println!("{}", serde_json::to_string_pretty(&shown)?);
            Ok(())
        }
        PluginCommand::Activate { name, version } => {
            let _: Activated = client
                .typed(
                    client
                        .request(Method::POST, &format!("/v1/plugins/{name}/activate"))
                        .json(&ActivateBody {
                            version: version.clone(),
                        }),
                )
                .await?;
            println!("{name}: version {version} is now active");
            Ok(())
        }
        PluginCommand::Rollback { name } => {
            let Activated { active, .. } = client
                .typed(client.request(Method::POST, &format!("/v1/plugins/{name}/rollback")))
                .await?;
            println!("{name}: rolled back; version {active} is now active");
            Ok(())
        }
        PluginCommand::Shadow { name, json, stop } => {
            let path = format!("/v1/plugins/{name}/shadow");
            if stop {
                client
                    .no_content(client.request(Method::DELETE, &path))
                    .await?;
                println!("{name}: shadow candidate stopped (still stored)");
                return Ok(());
            }
            let report: ShadowReport = client.typed(client.request(Method::GET, &path)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for line in shadow_lines(&report) {
                    println!("{line}");
                }
            }
            Ok(())
        }
        PluginCommand::Promote { name } => {
            let Promoted {
                active,
                from,
                promotion,
                ..
            } = client
                .typed(client.request(Method::POST, &format!("/v1/plugins/{name}/promote")))
                .await?;
            println!(
                "{name}: {active} promoted over {from} (promotion {promotion}); each partition is cut at \
                 the next offset its pipeline had not read: events below it stay on {from}, the \
                 rest go to {active} (the cuts: `spate plugin show {name}`)"
            );
            Ok(())
        }
        PluginCommand::New(_) | PluginCommand::Build(_) => {
            anyhow::bail!("`spate plugin new` and `spate plugin build` are local commands")
        }
        PluginCommand::Rm { name, purge } => {
            let path = match purge {
                true => format!("/v1/plugins/{name}?purge=true"),
                false => format!("/v1/plugins/{name}"),
            };
            client
                .no_content(client.request(Method::DELETE, &path))
                .await?;
            match purge {
                true => println!("removed plugin {name} and purged its state"),
                false => println!(
                    "removed plugin {name} and all its versions; its state is kept (and its \
                     namespace reserved) until `spate plugin rm {name} --purge`"
                ),
            }
            Ok(())
        }
    }
}

async fn deploy(client: &ApiClient, args: DeployArgs) -> anyhow::Result<()> {
    let manifest_path = match args.manifest.or(args.path) {
        Some(p) if p.is_dir() => p.join("spate.toml"),
        Some(p) => p,
        None => PathBuf::from("spate.toml"),
    };
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading the manifest {}", manifest_path.display()))?;
    let component_path = match args.component {
        Some(c) => c,
        None => find_component(&manifest_path, &manifest)?,
    };
    let component = std::fs::read(&component_path)
        .with_context(|| format!("reading the component {}", component_path.display()))?;
    eprintln!(
        "deploying {} with {} ({} bytes)...",
        manifest_path.display(),
        component_path.display(),
        component.len()
    );
    let form = Form::new()
        .part(
            "manifest",
            Part::text(manifest)
                .file_name("spate.toml")
                .mime_str("application/toml")?,
        )
        .part(
            "component",
            Part::bytes(component)
                .file_name("plugin.wasm")
                .mime_str("application/wasm")?,
        );
    let activate = if args.no_activate || args.shadow {
        "false"
    } else {
        "true"
    };
    let shadow = if args.shadow { "true" } else { "false" };
    let outcome: UploadOutcome = client
        .typed(
            client
                .request(Method::POST, "/v1/plugins")
                .query(&[("activate", activate), ("shadow", shadow)])
                .multipart(form),
        )
        .await?;
    let UploadOutcome {
        name,
        version,
        hash,
        active,
        unchanged,
        compile_ms,
        shadow,
    } = outcome;
    let short = hash.get(..12).unwrap_or(&hash);
    let what = if unchanged {
        "already stored, unchanged".to_string()
    } else if compile_ms == 0 {
        "stored (compiled artifact reused)".to_string()
    } else {
        format!("stored, compiled in {compile_ms} ms")
    };
    let state = if active {
        "active".to_string()
    } else if shadow {
        format!(
            "running as shadow beside the active version (`spate plugin shadow {name}`; promote with `spate plugin promote {name}`)"
        )
    } else {
        format!("not active (activate with `spate plugin activate {name} {version}`)")
    };
    println!("{name}@{version} sha256:{short} {what}; {state}");
    Ok(())
}

/// A shadow report as text: the counts, then each kept divergence.
pub fn shadow_lines(r: &ShadowReport) -> Vec<String> {
    let pct = |n: u64| {
        if r.compared == 0 {
            0.0
        } else {
            100.0 * n as f64 / r.compared as f64
        }
    };
    let mut out = vec![format!(
        "{} shadow {}: {} events compared, {} identical ({:.1}%), {} differing ({:.1}%), {} traps; {} skipped (budget {} of a core)",
        r.plugin,
        r.candidate,
        r.compared,
        r.identical,
        pct(r.identical),
        r.differing,
        pct(r.differing),
        r.traps,
        r.skipped,
        r.cpu_share
    )];
    if !r.runtimes.is_empty() {
        out.push(format!(
            "summed over {} runtime(s): {}",
            r.runtimes.len(),
            r.runtimes.join(", ")
        ));
    }
    for d in &r.divergences {
        let a = &d.active;

        out.push(format!(
            "{}/{}/{}  active {} ({}), candidate {}: {}",
            a.topic,
            a.partition,
            a.offset,
            a.outcome.class(),
            a.version,
            d.candidate.outcome.class(),
            super::replay::verdict_words(&d.diff)
        ));
        out.extend(super::replay::difference_lines(
            &d.diff,
            ("active", "candidate"),
        ));
    }
    out
}

/// The newest `.wasm` found where a build of the manifest's plugin would put it.
fn find_component(manifest_path: &Path, manifest: &str) -> anyhow::Result<PathBuf> {
    let name = toml::from_str::<toml::Table>(manifest)
        .ok()
        .and_then(|t| t.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .with_context(|| {
            format!(
                "{} has no `name`, so the component cannot be found by name; pass --component FILE",
                manifest_path.display()
            )
        })?;
    let crate_file = format!("{}.wasm", name.replace('-', "_"));
    let dir = manifest_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut candidates = vec![dir.join(format!("{name}.wasm")), dir.join(&crate_file)];
    for ancestor in dir.ancestors().chain(std::iter::once(Path::new("."))) {
        for profile in ["release", "debug"] {
            candidates.push(
                ancestor
                    .join("target/wasm32-wasip2")
                    .join(profile)
                    .join(&crate_file),
            );
        }
    }
    candidates
        .into_iter()
        .filter_map(|p| {
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            Some((modified, p))
        })
        .max_by_key(|(m, _)| *m)
        .map(|(_, p)| p)
        .with_context(|| {
            format!(
                "no component found for plugin `{name}` (looked for {crate_file} under target/wasm32-wasip2/ \
                 next to and above {}); build it with `cargo build --release --target wasm32-wasip2` \
                 or pass --component FILE",
                dir.display()
            )
        })
}

async fn list(client: &ApiClient) -> anyhow::Result<()> {
    let PluginList { plugins } = client
        .typed(client.request(Method::GET, "/v1/plugins"))
        .await?;
    if plugins.is_empty() {
        println!("no plugins deployed; deploy one with `spate plugin deploy DIR`");
        return Ok(());
    }
    let rows: Vec<[String; 3]> = plugins
        .into_iter()
        .map(|p| {
            let versions = p
                .versions
                .iter()
                .map(|v| v.version.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let active = p.active.unwrap_or_else(|| "-".into());
            let active = match p.shadow {
                Some(s) => format!("{active} (shadow {s})"),
                None => active,
            };
            [p.name, active, versions]
        })
        .collect();
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(4);
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0).max(6);
    println!("{:w0$}  {:w1$}  VERSIONS", "NAME", "ACTIVE");
    for [name, active, versions] in rows {
        println!("{name:w0$}  {active:w1$}  {versions}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn finds_the_newest_build_of_the_component() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("plugins/order-totals");
        std::fs::create_dir_all(&plugin).unwrap();
        let manifest = plugin.join("spate.toml");
        let text = "name = \"order-totals\"\n";
        std::fs::write(&manifest, text).unwrap();
        assert!(find_component(&manifest, text).is_err());
        let built = dir.path().join("plugins/target/wasm32-wasip2/release");
        std::fs::create_dir_all(&built).unwrap();
        std::fs::write(built.join("order_totals.wasm"), b"x").unwrap();
        assert_eq!(
            find_component(&manifest, text).unwrap(),
            built.join("order_totals.wasm")
        );
    }
}
