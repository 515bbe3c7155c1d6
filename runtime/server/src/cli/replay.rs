//! `spate replay`: run stored events through a plugin version in capture mode and show
//! what each did, and how that differs from its effect record (`POST
//! /v1/plugins/{name}/replay`; the answer decodes into `spate::api::replay`'s types).

use super::client::ApiClient;
use super::parked::{parse_time, segment};
use clap::Args;
use reqwest::Method;
use spate::api::replay::{MAX_LIMIT, ReplayReport, ReplayRequest, ReplayedEvent};
use spate_core::host::record::{Bytes, Diff, EffectRecord, Outcome};

/// Help text after `spate replay --help`.
pub const HELP: &str = "\
Runs stored events through a version of the plugin with nothing applied, emitted or
committed: state reads see the current state plus the replayed events' own earlier writes.
Each event prints what it did (outcome, state writes, cache writes, emits) as JSON; where
the plugin keeps an effect record ([record] enabled = true in its manifest), it also prints
how the replay differs from what the event did when it was handled: same, outcome differs,
state differs, cache differs, emits differ, with both values.

Examples:
  spate replay order-totals --version 2.0.0 --event orders/0/42
  spate replay order-totals --version 2.0.0 --partition 0 --from-offset 100 --to-offset 199
  spate replay order-totals --key c-42 --from 2026-12-01 --limit 50
  spate replay order-totals --version 2.0.0 --json | jq '.events[] | select(.diff.verdicts != [\"same\"])'";

/// Options of `spate replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Plugin name.
    pub plugin: String,
    /// The version to run (default: the active one).
    #[arg(long)]
    pub version: Option<String>,
    /// One event, as TOPIC/PARTITION/OFFSET.
    #[arg(long, value_name = "TOPIC/PARTITION/OFFSET", conflicts_with_all = ["topic", "partition", "from_offset", "to_offset"])]
    pub event: Option<String>,
    /// The topic (default: the plugin's only subscription).
    #[arg(long)]
    pub topic: Option<String>,
    /// One partition (default: all).
    #[arg(long)]
    pub partition: Option<u32>,
    /// First offset (inclusive).
    #[arg(long, value_name = "OFFSET")]
    pub from_offset: Option<u64>,
    /// Last offset (inclusive).
    #[arg(long, value_name = "OFFSET")]
    pub to_offset: Option<u64>,
    /// Events at or after TIME (RFC 3339, a UTC date or Unix ms).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from: Option<i64>,
    /// Events before TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub to: Option<i64>,
    /// Events of this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Events replayed at most.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_LIMIT as u64))]
    pub limit: u64,
    /// Print the whole answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run `spate replay`.
pub async fn run(client: &ApiClient, args: ReplayArgs) -> anyhow::Result<()> {
    let body = ReplayRequest {
        version: args.version,
        event: args.event,
        topic: args.topic,
        partition: args.partition,
        from_offset: args.from_offset,
        to_offset: args.to_offset,
        from_ms: args.from,
        to_ms: args.to,
        key: args.key,
        limit: Some(usize::try_from(args.limit)?),
    };
    let report: ReplayReport = client
        .typed(
            client
                .request(
                    Method::POST,
                    &format!("/v1/plugins/{}/replay", segment(&args.plugin)),
                )
                .json(&body),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in lines(&report) {
            println!("{line}");
        }
    }
    Ok(())
}

/// The report as text: a summary, then each event's line, effects and differences.
pub fn lines(r: &ReplayReport) -> Vec<String> {
    let mut out = vec![format!(
        "replayed {} event{} of {} through {}@{} (read {}{}): {} same, {} differ, {} without a record",
        r.events.len(),
        if r.events.len() == 1 { "" } else { "s" },
        r.topic,
        r.plugin,
        r.version,
        r.scanned,
        if r.truncated {
            ", stopped at the limit"
        } else {
            ""
        },
        r.same,
        r.differing,
        r.unrecorded
    )];
    for e in &r.events {
        out.extend(event_lines(e));
    }
    out
}

fn event_lines(e: &ReplayedEvent) -> Vec<String> {
    let r = &e.replayed;
    let verdict = match &e.diff {
        None => "no record".to_owned(),
        Some(d) => verdict_words(d),
    };
    let recorded_version = e
        .recorded
        .as_ref()
        .map(|rec| format!(" (recorded: {} by {})", rec.outcome.class(), rec.version))
        .unwrap_or_default();
    let mut out = vec![format!(
        "{}/{}/{}  key {}  {}  {verdict}{recorded_version}",
        r.topic,
        r.partition,
        r.offset,
        r.key.as_ref().map_or_else(|| "-".to_owned(), show),
        r.outcome.class(),
    )];
    if let Outcome::Failed { reason, .. } = &r.outcome {
        out.push(format!("  reason: {reason}"));
    }
    out.push(format!("  effects: {}", effects_json(r)));
    if let Some(d) = &e.diff {
        out.extend(difference_lines(d, ("recorded", "replayed")));
    }
    out
}

/// A diff's verdicts as words (`outcome differs, state differs`).
pub fn verdict_words(d: &Diff) -> String {
    d.verdicts
        .iter()
        .filter_map(|v| Some(serde_json::to_value(v).ok()?.as_str()?.replace('-', " ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per difference of `d`, its two sides named by `sides`.
pub fn difference_lines(d: &Diff, (left, right): (&str, &str)) -> Vec<String> {
    d.differences
        .iter()
        .map(|x| {
            let at = x
                .key
                .as_deref()
                .map(|k| format!(" {k}"))
                .unwrap_or_default();
            format!(
                "  {}{at}: {left} {} -> {right} {}",
                x.what, x.recorded, x.replayed
            )
        })
        .collect()
}

/// A record's effects (state, cache, emits) as one line of JSON.
fn effects_json(r: &EffectRecord) -> String {
    serde_json::json!({
        "state": r.state,
        "cache": r.cache,
        "emits": r.emits,
    })
    .to_string()
}

fn show(b: &Bytes) -> String {
    match b {
        Bytes::Text(s) => s.clone(),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}
