//! `spate parked ...` and `spate dlq redrive`: a plugin's parked keys, their redrive and
//! discard, and the redrive of its dead letters, through the API's parked routes (the
//! answers decode into `spate::api::parked`'s types).

use super::ParkedCommand;
use super::client::ApiClient;
use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat};
use clap::Args;
use reqwest::Method;
use spate::api::parked::{
    DeadLetterRedrive, DeadLetterSelection, Filed, KeySelection, MAX_DEAD_LETTERS_SCANNED,
    MAX_LIMIT, ParkedList, ParkedShow, PayloadEncoding,
};
use spate_core::state::parked::{Action, now_ms};

/// Help text after `spate parked ls --help`.
pub const LS_HELP: &str = "\
A plugin whose manifest says on-failure = \"park-key\" parks a key when one of its events
exhausts its attempts (or is rejected): that event and every later one of the key wait, in
order, while other keys flow. Each line is a parked key: how many events wait, since when,
which version failed it and why; REDRIVES and LAST REASON appear once a redrive failed again.

Examples:
  spate parked ls order-totals
  spate parked ls order-totals --json | jq '.keys[].key'";

/// Help text after `spate parked show --help`.
pub const SHOW_HELP: &str = "\
KEY is the key as text; with --hex, its bytes in hex (for keys that are not UTF-8, which
`spate parked ls` shows in hex). Payloads that are not UTF-8 are shown as base64:...

Examples:
  spate parked show order-totals c-42
  spate parked show order-totals ff00 --hex
  spate parked show order-totals c-42 --json | jq '.events[].payload'";

/// Help text after `spate parked redrive --help`.
pub const REDRIVE_HELP: &str = "\
The runtime owning each key's partition handles the key's parked events again, in order,
through the version active now (deploy the fix first), within about a second; the key is
unparked once its queue is empty, or parks again at the first event that fails again.
Watch `spate parked ls PLUGIN`.

Examples:
  spate parked redrive order-totals c-42 c-43
  spate parked redrive order-totals --all";

/// Help text after `spate parked discard --help`.
pub const DISCARD_HELP: &str = "\
The runtime owning each key's partition sends the key's parked events to the plugin's
dead-letter topic (kind `discarded`) and unparks the key; its later events are handled as
they come. `spate dlq redrive` can send them back later.

Examples:
  spate parked discard order-totals c-42
  spate parked discard order-totals --all";

/// Help text after `spate dlq redrive --help`.
pub const DLQ_REDRIVE_HELP: &str = "\
Reads the plugin's dead-letter topic from its start (at most 100000 records per run) and
hands the dead letters written in [--from, --to) (and of --key) back to the runtime owning
each one's original partition, which handles them through the active version in their
original order per key. Each dead letter is redriven at most once; one that fails again is
dead-lettered again. Dead letters of topics the plugin no longer subscribes to are skipped.

TIME is RFC 3339 (2025-06-01T08:00:00Z, 2025-06-01T10:00:00+02:00), a UTC date (2025-06-01)
or Unix milliseconds (1748764800000).

Examples:
  spate dlq redrive order-totals
  spate dlq redrive order-totals --key c-42
  spate dlq redrive order-totals --from 2025-06-01T08:00:00Z --to 2025-06-01T09:00:00Z";

/// Options of `spate parked ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Plugin name.
    pub plugin: String,
    /// Most keys to list (at most 10000) [default: 1000].
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Print the API's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `spate parked show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Plugin name.
    pub plugin: String,
    /// The parked key (as text, or hex with --hex).
    pub key: String,
    /// KEY is given in hex.
    #[arg(long)]
    pub hex: bool,
    /// Most events to show (at most 10000) [default: 1000].
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Print the API's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `spate parked redrive` and `spate parked discard`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Plugin name.
    pub plugin: String,
    /// Parked keys (as text, or hex with --hex).
    #[arg(
        value_name = "KEY",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub keys: Vec<String>,
    /// Every parked key of the plugin (up to 10000 per run).
    #[arg(long)]
    pub all: bool,
    /// The KEYs are given in hex.
    #[arg(long, conflicts_with = "all")]
    pub hex: bool,
}

/// Options of `spate dlq redrive`.
#[derive(Debug, Args)]
pub struct DlqRedriveArgs {
    /// Plugin name.
    pub plugin: String,
    /// Only dead letters of this key.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Only dead letters written at or after TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from: Option<i64>,
    /// Only dead letters written before TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub to: Option<i64>,
}

/// Run a `spate parked` command.
pub async fn run(client: &ApiClient, cmd: ParkedCommand) -> anyhow::Result<()> {
    match cmd {
        ParkedCommand::Ls(args) => ls(client, args).await,
        ParkedCommand::Show(args) => show(client, args).await,
        ParkedCommand::Redrive(args) => act(client, args, Action::Redrive).await,
        ParkedCommand::Discard(args) => act(client, args, Action::Discard).await,
    }
}

/// A time as RFC 3339, a UTC date or Unix milliseconds, in Unix milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    const FORMS: &str = "give RFC 3339 (2025-06-01T08:00:00Z, 2025-06-01T10:00:00+02:00), a UTC date (2025-06-01) or Unix milliseconds (1748764800000)";
    let s = text.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let ms: i64 = s
            .parse()
            .map_err(|_| format!("`{s}` is too large for Unix milliseconds; {FORMS}"))?;
        // Milliseconds of any time since 1973 have 12 digits or more.
        if ms < 100_000_000_000 {
            return Err(format!(
                "`{s}` looks like Unix seconds: give milliseconds ({s}000), or {FORMS}"
            ));
        }
        return Ok(ms);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(NaiveTime::MIN).and_utc().timestamp_millis());
    }
    Err(format!("`{s}` is not a time: {FORMS}"))
}

/// `ms` as an RFC 3339 UTC time to the second.
fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// How long `ms` milliseconds is, to two units.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `at` (wall-clock millis) with how long ago it was.
fn since(at: u64) -> String {
    format!(
        "{} ({} ago)",
        rfc3339(i64::try_from(at).unwrap_or(i64::MAX)),
        age(now_ms().saturating_sub(at))
    )
}

/// `s` percent-encoded as one path segment.
pub(super) fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `s` on one line, cut to `width` characters (the last one `…` when cut).
fn cell(s: &str, width: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= width {
        return flat;
    }
    let mut cut: String = flat.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Columns of the terminal (120 when stdout is not one).
fn terminal_width() -> usize {
    console::Term::stdout()
        .size_checked()
        .map_or(120, |(_, cols)| usize::from(cols))
}

/// `rows` under `head` in aligned columns. The columns in `flexible` share what the
/// others leave of `width` (each at least 16 characters) and are cut to fit.
fn table(head: &[&str], rows: &[Vec<String>], flexible: &[usize], width: usize) -> Vec<String> {
    let n = head.len();
    let natural: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| cell(c, usize::MAX).chars().count()))
                .chain(std::iter::once(head[i].len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let fixed: usize = (0..n)
        .filter(|i| !flexible.contains(i))
        .map(|i| natural[i] + 2)
        .sum();
    let mut left = width.saturating_sub(fixed + 2 * flexible.len());
    let mut widths = natural.clone();
    // Narrow flexible columns keep their width and leave the rest to the wider ones.
    let mut order: Vec<usize> = flexible.to_vec();
    order.sort_by_key(|i| natural[*i]);
    for (done, &i) in order.iter().enumerate() {
        let share = (left / (order.len() - done)).max(16);
        widths[i] = natural[i].min(share);
        left = left.saturating_sub(widths[i]);
    }
    std::iter::once(head.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .chain(rows.iter().cloned())
        .map(|row| {
            let cells: Vec<String> = (0..n)
                .map(|i| {
                    let text = cell(row.get(i).map_or("", String::as_str), widths[i]);
                    if i + 1 == n {
                        text
                    } else {
                        let pad = widths[i].saturating_sub(text.chars().count());
                        format!("{text}{}", " ".repeat(pad))
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

async fn ls(client: &ApiClient, args: LsArgs) -> anyhow::Result<()> {
    let mut req = client.request(
        Method::GET,
        &format!("/v1/plugins/{}/parked", segment(&args.plugin)),
    );
    if let Some(limit) = args.limit {
        req = req.query(&[("limit", limit)]);
    }
    let list: ParkedList = client.typed(req).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for line in ls_lines(&list, terminal_width()) {
        println!("{line}");
    }
    if list.truncated {
        eprintln!(
            "more keys are parked than listed; raise --limit (at most {MAX_LIMIT}) to see more"
        );
    }
    Ok(())
}

fn ls_lines(list: &ParkedList, width: usize) -> Vec<String> {
    if list.keys.is_empty() {
        return vec![format!("no keys of {} are parked", list.plugin)];
    }
    let redrives = list.keys.iter().any(|k| k.redrives > 0);
    let mut head = vec!["KEY", "EVENTS", "SINCE", "VERSION", "FIRST REASON"];
    let mut flexible = vec![4];
    if redrives {
        head.extend(["REDRIVES", "LAST REASON"]);
        flexible.push(6);
    }
    let rows: Vec<Vec<String>> = list
        .keys
        .iter()
        .map(|k| {
            let mut row = vec![
                k.key.clone(),
                k.events.to_string(),
                since(k.since_ms),
                k.version.clone(),
                k.first_reason.clone(),
            ];
            if redrives {
                row.push(k.redrives.to_string());
                row.push(k.last_reason.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    table(&head, &rows, &flexible, width)
}

async fn show(client: &ApiClient, args: ShowArgs) -> anyhow::Result<()> {
    // Always in hex: any key, `/` and `redrive` included, is one path segment.
    let hex_key = if args.hex {
        hex::decode(&args.key).map_err(|e| {
            anyhow::anyhow!(
                "`{}` is not hex ({e}); drop --hex to give the key as text",
                args.key
            )
        })?;
        args.key.to_ascii_lowercase()
    } else {
        hex::encode(args.key.as_bytes())
    };
    let mut req = client
        .request(
            Method::GET,
            &format!("/v1/plugins/{}/parked/{hex_key}", segment(&args.plugin)),
        )
        .query(&[("hex", "true")]);
    if let Some(limit) = args.limit {
        req = req.query(&[("limit", limit)]);
    }
    let shown: ParkedShow = client.typed(req).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    for line in show_lines(&shown, terminal_width()) {
        println!("{line}");
    }
    if shown.truncated {
        eprintln!(
            "showing {} of {} parked events; raise --limit (at most {MAX_LIMIT}) to see more",
            shown.events.len(),
            shown.key.events
        );
    }
    Ok(())
}

fn show_lines(shown: &ParkedShow, width: usize) -> Vec<String> {
    let k = &shown.key;
    let mut out = vec![
        format!(
            "key {} of {}: {} event{} parked since {}",
            k.key,
            shown.plugin,
            k.events,
            if k.events == 1 { "" } else { "s" },
            since(k.since_ms)
        ),
        format!(
            "  partition:     {}/{} (its owner carries out redrives and discards)",
            k.topic, k.partition
        ),
        format!(
            "  first failure: {} (version {})",
            cell(&k.first_reason, width.saturating_sub(40).max(40)),
            k.version
        ),
    ];
    if k.redrives > 0 {
        out.push(format!(
            "  redrives:      {} failed again; last: {}",
            k.redrives,
            cell(
                k.last_reason.as_deref().unwrap_or("-"),
                width.saturating_sub(40).max(40)
            )
        ));
    }
    out.push(String::new());
    let rows: Vec<Vec<String>> = shown
        .events
        .iter()
        .map(|e| {
            vec![
                format!("{}/{}/{}", e.topic, e.partition, e.offset),
                e.kind.clone(),
                e.attempts.to_string(),
                e.version.clone(),
                e.reason.clone(),
                match e.payload_encoding {
                    PayloadEncoding::Utf8 => e.payload.clone(),
                    PayloadEncoding::Base64 => format!("base64:{}", e.payload),
                },
            ]
        })
        .collect();
    out.extend(table(
        &[
            "TOPIC/PARTITION/OFFSET",
            "KIND",
            "ATTEMPTS",
            "VERSION",
            "REASON",
            "PAYLOAD",
        ],
        &rows,
        &[4, 5],
        width,
    ));
    out
}

async fn act(client: &ApiClient, args: KeysArgs, action: Action) -> anyhow::Result<()> {
    let body = KeySelection {
        keys: (!args.all).then_some(args.keys),
        all: args.all.then_some(true),
        hex: args.hex,
    };
    let filed: Filed = client
        .typed(
            client
                .request(
                    Method::POST,
                    &format!(
                        "/v1/plugins/{}/parked/{}",
                        segment(&args.plugin),
                        action.as_str()
                    ),
                )
                .json(&body),
        )
        .await?;
    if filed.requested.is_empty() && !args.all {
        anyhow::bail!(
            "nothing to {}: not parked in {}: {}; `spate parked ls {}` lists the parked keys",
            action.as_str(),
            filed.plugin,
            filed.not_parked.join(", "),
            filed.plugin
        );
    }
    for line in filed_lines(&filed) {
        println!("{line}");
    }
    Ok(())
}

/// Up to 10 of `names`, then how many more.
fn some(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

fn filed_lines(filed: &Filed) -> Vec<String> {
    let verb = filed.action.as_str();
    if filed.requested.is_empty() {
        return vec![format!(
            "nothing to {verb}: no key of {} is parked",
            filed.plugin
        )];
    }
    let n = filed.requested.len();
    let keys: Vec<String> = filed.requested.iter().map(|r| r.key.clone()).collect();
    let mut first = format!(
        "{verb} requested for {n} key{} ({})",
        if n == 1 { "" } else { "s" },
        some(&keys)
    );
    if !filed.not_parked.is_empty() {
        first.push_str(&format!("; not parked: {}", some(&filed.not_parked)));
    }
    let mut out = vec![first];
    if filed.truncated {
        out.push(format!(
            "more than {MAX_LIMIT} keys are parked: run it again for the rest once these are done"
        ));
    }
    let what = match filed.action {
        Action::Discard => "their events go to the dead-letter topic and the keys are unparked",
        _ => "keys are unparked once their events are handled",
    };
    out.push(format!(
        "the runtimes owning their partitions carry it out within a second ({what}); watch `spate parked ls {}`",
        filed.plugin
    ));
    out
}

/// Run `spate dlq redrive`.
pub async fn dlq_redrive(client: &ApiClient, args: DlqRedriveArgs) -> anyhow::Result<()> {
    if let (Some(from), Some(to)) = (args.from, args.to)
        && from >= to
    {
        anyhow::bail!(
            "--from ({}) must be before --to ({}), which is exclusive",
            rfc3339(from),
            rfc3339(to)
        );
    }
    let body = DeadLetterSelection {
        key: args.key,
        from_ms: args.from,
        to_ms: args.to,
    };
    let answer: DeadLetterRedrive = client
        .typed(
            client
                .request(
                    Method::POST,
                    &format!("/v1/plugins/{}/dead-letters/redrive", segment(&args.plugin)),
                )
                .json(&body),
        )
        .await?;
    for line in dlq_lines(&answer) {
        println!("{line}");
    }
    Ok(())
}

fn dlq_lines(r: &DeadLetterRedrive) -> Vec<String> {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut out = vec![format!(
        "{}: read {} of {}, {} in the range asked for",
        r.plugin,
        plural(r.scanned, "record", "records"),
        r.topic,
        r.matched
    )];
    if r.events == 0 {
        out.push("nothing to redrive".into());
    } else {
        out.push(format!(
            "redrive requested for {} of {} ({})",
            plural(r.events, "dead letter", "dead letters"),
            plural(r.keys, "key", "keys"),
            plural(r.requests, "request", "requests")
        ));
    }
    let skipped: Vec<String> = [
        (r.not_dead_letters, "not dead letters of this runtime"),
        (r.other_plugin, "written by another plugin"),
        (
            r.not_subscribed,
            "of topics the active version no longer subscribes to",
        ),
        (r.duplicates, "repeats of an event already taken"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, why)| format!("{n} {why}"))
    .collect();
    if !skipped.is_empty() {
        out.push(format!("skipped: {}", skipped.join(", ")));
    }
    if r.truncated {
        out.push(format!(
            "the scan stopped early (at most {MAX_DEAD_LETTERS_SCANNED} records, or 64 MiB of dead letters, per run): later records of {} were not looked at",
            r.topic
        ));
    }
    if r.events > 0 {
        out.push(format!(
            "each is handled at most once, through the active version; any that fail again go back to {} (`spate events tail {} --follow`)",
            r.topic, r.topic
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use spate::api::parked::FiledRequest;
    use spate_core::state::parked::ParkedKey;

    #[test]
    fn times_are_rfc3339_dates_or_unix_millis() {
        assert_eq!(parse_time("2025-06-01T08:00:00Z"), Ok(1_748_764_800_000));
        assert_eq!(
            parse_time("2025-06-01T10:00:00.250+02:00"),
            Ok(1_748_764_800_250)
        );
        assert_eq!(parse_time("2025-06-01"), Ok(1_748_736_000_000));
        assert_eq!(parse_time(" 1748764800000 "), Ok(1_748_764_800_000));
        let seconds = parse_time("1748764800").unwrap_err();
        assert!(seconds.contains("1748764800000"), "{seconds}");
        for bad in ["yesterday", "2025-13-01", "2025-06-01 08:00", "", "-5"] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
        assert!(parse_time("99999999999999999999").is_err());
        assert_eq!(rfc3339(1_748_764_800_000), "2025-06-01T08:00:00Z");
    }

    #[test]
    fn keys_or_all_and_times_are_checked_when_parsing() {
        use crate::cli::{Cli, Command, DlqCommand};
        use clap::Parser as _;
        let parse = |args: &[&str]| Cli::try_parse_from([&["spate"], args].concat());
        let cli = parse(&["parked", "redrive", "totals", "c-1", "c-2"]).unwrap();
        match cli.command {
            Command::Parked(ParkedCommand::Redrive(a)) => {
                assert_eq!((a.keys, a.all), (vec!["c-1".into(), "c-2".into()], false))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["parked", "discard", "totals", "--all"]).is_ok());
        assert!(parse(&["parked", "redrive", "totals"]).is_err());
        assert!(parse(&["parked", "redrive", "totals", "--all", "c-1"]).is_err());
        assert!(parse(&["parked", "redrive", "totals", "--all", "--hex"]).is_err());
        let cli = parse(&[
            "dlq",
            "redrive",
            "totals",
            "--from",
            "2025-06-01",
            "--key",
            "c-1",
        ])
        .unwrap();
        match cli.command {
            Command::Dlq(DlqCommand::Redrive(a)) => {
                assert_eq!((a.from, a.to), (Some(1_748_736_000_000), None));
                assert_eq!(a.key.as_deref(), Some("c-1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["dlq", "redrive", "totals", "--to", "soon"]).is_err());
    }

    #[test]
    fn ages_and_path_segments() {
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(125_000), "2m");
        assert_eq!(age(2 * 3_600_000 + 5 * 60_000), "2h 5m");
        assert_eq!(age(3 * 86_400_000 + 4 * 3_600_000), "3d 4h");
        assert_eq!(segment("c-1/a b?"), "c-1%2Fa%20b%3F");
    }

    fn key(name: &str, reason: &str, redrives: u32) -> ParkedKey {
        ParkedKey {
            key: name.into(),
            key_id: hex::encode(name),
            topic: "orders".into(),
            partition: 3,
            since_ms: now_ms() - 3_700_000,
            first_reason: reason.into(),
            version: "1.0.0".into(),
            events: 2,
            redrives,
            last_reason: (redrives > 0).then(|| "still failing".to_string()),
        }
    }

    #[test]
    fn the_parked_table_fits_the_width_and_shows_redrives_only_when_there_are() {
        let list = ParkedList {
            plugin: "totals".into(),
            keys: vec![
                key("c-1", &"x".repeat(300), 0),
                key("c-22", "bad\namount", 0),
            ],
            truncated: false,
        };
        let lines = ls_lines(&list, 100);
        assert!(lines[0].starts_with("KEY   EVENTS  SINCE"), "{lines:?}");
        assert!(!lines[0].contains("REDRIVES"));
        assert!(lines.iter().all(|l| l.chars().count() <= 100), "{lines:#?}");
        assert!(lines[1].ends_with('…'), "{}", lines[1]);
        assert!(lines[1].contains("(1h 1m ago)"), "{}", lines[1]);
        assert!(lines[2].ends_with("bad amount"), "{}", lines[2]);

        let list = ParkedList {
            keys: vec![key("c-1", "rejected", 2)],
            ..list
        };
        let lines = ls_lines(&list, 200);
        assert!(lines[0].ends_with("REDRIVES  LAST REASON"), "{lines:?}");
        assert!(lines[1].ends_with("2         still failing"), "{lines:?}");
        let empty = ParkedList {
            keys: vec![],
            ..list
        };
        assert_eq!(ls_lines(&empty, 80), vec!["no keys of totals are parked"]);
    }

    #[test]
    fn filed_requests_are_summed_up() {
        let filed = Filed {
            plugin: "totals".into(),
            action: Action::Redrive,
            requested: ["c-1", "c-2"]
                .iter()
                .map(|k| FiledRequest {
                    key: k.to_string(),
                    topic: "orders".into(),
                    partition: 0,
                    id: "1".into(),
                })
                .collect(),
            not_parked: vec!["c-9".into()],
            truncated: false,
        };
        let lines = filed_lines(&filed);
        assert_eq!(
            lines[0],
            "redrive requested for 2 keys (c-1, c-2); not parked: c-9"
        );
        assert!(lines[1].contains("spate parked ls totals"), "{lines:?}");
    }
}
