//! `spate events send` and `spate events tail` (the API's bodies are
//! `spate::api::events`'s types).

use super::client::{ApiClient, is_status};
use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use spate::api::events::{
    AppendBatch, AppendEvent, AppendedEvents, EventPage, EventView, TopicInfo,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Events per request when sending a file.
const BATCH_EVENTS: usize = 500;
/// Serialized bytes per request when sending a file (under the server's default body limit).
const BATCH_BYTES: usize = 4 << 20;
/// How often `tail --follow` polls.
const POLL: Duration = Duration::from_millis(250);
/// Events asked for per read.
const PAGE: usize = 1000;

/// Help text after `spate events send --help`.
pub const SEND_HELP: &str = "\
PAYLOAD is JSON (quote text as a JSON string: '\"hello\"'). The key picks the partition, and
events with the same key are handled in order.

With --file, each non-empty line is one event:
  {\"key\": \"c-1\", \"payload\": {...}, \"headers\": {\"source\": \"import\"}, \"topic\": \"orders\"}
where only `payload` (any JSON) or `payload_base64` (binary) is required; `topic` overrides TOPIC
for that line, and `key_base64` may replace `key`. Every line is checked before anything is
sent: a malformed line stops the command with its line number and nothing is sent. Events go
out in order, up to 500 per request; if the server refuses a request, the events of earlier
requests stay sent and the error says how many that was.

Examples:
  spate events send orders --key c-42 '{\"order_id\":\"o-1\",\"customer_id\":\"c-42\",\"amount_cents\":12500}'
  spate events send orders --header source=cli '\"plain text is a JSON string\"'
  spate events send orders --file plugins/order-totals/sample-events.jsonl";

/// Help text after `spate events tail --help`.
pub const TAIL_HELP: &str = "\
Each line is a JSON object: topic, partition, offset, key, payload (or payload_text /
payload_base64 when it is not JSON), headers and timestamp_ms. Without --from-beginning the
last N events are shown (like `tail -n`); with it, every event from the start (at most N if
--limit is given). --follow then keeps printing new events until Ctrl-C.

Examples:
  spate events tail customer-totals
  spate events tail orders --from-beginning
  spate events tail order-totals.dlq --follow
  spate events tail workflows -n 50 --follow | jq .payload";

/// Options of `spate events send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Topic to append to (with --file: for lines without a `topic`).
    #[arg(value_name = "TOPIC")]
    pub topic: Option<String>,
    /// The event's payload as JSON.
    #[arg(value_name = "PAYLOAD_JSON", conflicts_with = "file")]
    pub payload: Option<String>,
    /// Partition key of the event.
    #[arg(long, value_name = "KEY", conflicts_with = "file")]
    pub key: Option<String>,
    /// A header, `name=value`; repeat for more.
    #[arg(long = "header", value_name = "NAME=VALUE", conflicts_with = "file")]
    pub headers: Vec<String>,
    /// Send every line of a JSONL file instead.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

/// Options of `spate events tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Topic to read.
    #[arg(value_name = "TOPIC")]
    pub topic: String,
    /// Start at the first event instead of the last N.
    #[arg(long)]
    pub from_beginning: bool,
    /// Keep printing new events until Ctrl-C (polls every 250 ms).
    #[arg(long, short)]
    pub follow: bool,
    /// How many events: the last N (default 10), or with --from-beginning the first N (default all).
    #[arg(long, short = 'n', value_name = "N")]
    pub limit: Option<usize>,
}

/// Run `spate events send`.
pub async fn send(client: &ApiClient, args: SendArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.file {
        return send_file(client, args.topic.as_deref(), file).await;
    }
    let (Some(topic), Some(payload)) = (args.topic, args.payload) else {
        anyhow::bail!(
            "give a TOPIC and a PAYLOAD_JSON, e.g. `spate events send orders '{{\"amount\":3}}'`, or --file FILE"
        );
    };
    let payload: Value = serde_json::from_str(&payload).map_err(|e| {
        anyhow::anyhow!(
            "PAYLOAD_JSON is not valid JSON ({e}); quote plain text as a JSON string, e.g. '\"hello\"'"
        )
    })?;
    let mut headers = BTreeMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once('=')
            .filter(|(n, _)| !n.is_empty())
            .with_context(|| format!("--header `{h}` must look like name=value"))?;
        headers.insert(name.to_string(), value.to_string());
    }
    let event = AppendEvent {
        headers,
        key: args.key,
        payload: Some(payload),
        ..AppendEvent::default()
    };
    let AppendedEvents { appended } = client
        .typed(
            client
                .request(Method::POST, &format!("/v1/topics/{topic}/events"))
                .json(&event),
        )
        .await?;
    let at = appended
        .first()
        .map(|a| format!("partition {}, offset {}", a.partition, a.offset))
        .unwrap_or_default();
    println!("sent 1 event to {topic} ({at})");
    Ok(())
}

/// One checked line of a JSONL file.
struct Line {
    topic: String,
    event: AppendEvent,
    size: usize,
}

const LINE_FIELDS: &[&str] = &[
    "topic",
    "key",
    "key_base64",
    "payload",
    "payload_base64",
    "headers",
];

/// Parse and check every line; the first problem is an error naming its line.
fn parse_jsonl(text: &str, default_topic: Option<&str>) -> anyhow::Result<Vec<Line>> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let fail = |m: String| anyhow::anyhow!("line {n}: {m}; nothing was sent");
        let value: Value =
            serde_json::from_str(raw).map_err(|e| fail(format!("not valid JSON ({e})")))?;
        let Value::Object(mut obj) = value else {
            return Err(fail("each line must be a JSON object".into()));
        };
        if let Some(k) = obj.keys().find(|k| !LINE_FIELDS.contains(&k.as_str())) {
            return Err(fail(format!(
                "unknown field `{k}` (allowed: {})",
                LINE_FIELDS.join(", ")
            )));
        }
        let topic = match obj.remove("topic") {
            Some(Value::String(t)) => t,
            Some(_) => return Err(fail("`topic` must be a string".into())),
            None => default_topic
                .map(str::to_string)
                .ok_or_else(|| fail("no `topic` on this line and no TOPIC argument".into()))?,
        };
        if !spate_core::manifest::valid_topic(&topic) {
            return Err(fail(format!("`{topic}` is not a valid topic name")));
        }
        let has_payload = obj.contains_key("payload");
        if has_payload == obj.contains_key("payload_base64") {
            return Err(fail(
                "give exactly one of `payload` (JSON) and `payload_base64`".into(),
            ));
        }
        if obj.contains_key("key") && obj.contains_key("key_base64") {
            return Err(fail("give `key` or `key_base64`, not both".into()));
        }
        for field in ["key", "key_base64", "payload_base64"] {
            if obj
                .get(field)
                .is_some_and(|v| !v.is_string() && !v.is_null())
            {
                return Err(fail(format!("`{field}` must be a string")));
            }
        }
        match obj.get("headers") {
            None => {}
            Some(Value::Object(h)) if h.values().all(Value::is_string) => {}
            Some(_) => {
                return Err(fail(
                    "`headers` must be an object of string values, e.g. {\"source\":\"import\"}"
                        .into(),
                ));
            }
        }
        let event = Value::Object(obj);
        let size = event.to_string().len();
        let event = serde_json::from_value(event).map_err(|e| fail(e.to_string()))?;
        lines.push(Line { topic, event, size });
    }
    if lines.is_empty() {
        anyhow::bail!("the file has no events");
    }
    Ok(lines)
}

/// Consecutive lines of one topic, cut at [`BATCH_EVENTS`] events or [`BATCH_BYTES`].
fn batches(lines: Vec<Line>) -> Vec<(String, Vec<AppendEvent>)> {
    let mut out: Vec<(String, Vec<AppendEvent>, usize)> = Vec::new();
    for line in lines {
        match out.last_mut() {
            Some((topic, events, bytes))
                if *topic == line.topic
                    && events.len() < BATCH_EVENTS
                    && *bytes + line.size <= BATCH_BYTES =>
            {
                *bytes += line.size;
                events.push(line.event);
            }
            _ => out.push((line.topic, vec![line.event], line.size)),
        }
    }
    out.into_iter().map(|(t, e, _)| (t, e)).collect()
}

async fn send_file(
    client: &ApiClient,
    default_topic: Option<&str>,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let lines =
        parse_jsonl(&text, default_topic).with_context(|| format!("in {}", file.display()))?;
    let total = lines.len() as u64;
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} events ({per_sec}, {eta} left)")
    {
        bar.set_style(style);
    }
    let mut per_topic: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent = 0u64;
    for (topic, events) in batches(lines) {
        let n = events.len() as u64;
        let result: anyhow::Result<AppendedEvents> = client
            .typed(
                client
                    .request(Method::POST, &format!("/v1/topics/{topic}/events"))
                    .json(&AppendBatch { events }),
            )
            .await;
        if let Err(e) = result {
            bar.abandon();
            return Err(e.context(format!(
                "sent {sent} of {total} events before this error (the failed request of {n} events to `{topic}` was not appended)"
            )));
        }
        sent += n;
        *per_topic.entry(topic).or_default() += n;
        bar.inc(n);
    }
    bar.finish_and_clear();
    let summary = per_topic
        .iter()
        .map(|(t, n)| format!("{t}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("sent {sent} events ({summary})");
    Ok(())
}

/// How often a read answered 503 `busy` is tried again, a second apart.
const BUSY_RETRIES: u32 = 30;

fn is_busy(e: &anyhow::Error) -> bool {
    e.downcast_ref::<super::client::ApiFailure>()
        .is_some_and(|f| f.status == StatusCode::SERVICE_UNAVAILABLE && f.code == "busy")
}

async fn read_page(client: &ApiClient, topic: &str, from: &str) -> anyhow::Result<EventPage> {
    let limit = PAGE.to_string();
    let mut attempts = 0;
    loop {
        let answer = client
            .typed(
                client
                    .request(Method::GET, &format!("/v1/topics/{topic}/events"))
                    .query(&[("from", from), ("limit", limit.as_str())]),
            )
            .await;
        match answer {
            // The server serves a few reads at once and asks the rest to come back.
            Err(e) if is_busy(&e) && attempts < BUSY_RETRIES => {
                attempts += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// The topic's end offsets, or `None` if it does not exist yet.
async fn end_offsets(client: &ApiClient, topic: &str) -> anyhow::Result<Option<Vec<u64>>> {
    match client
        .typed::<TopicInfo>(client.request(Method::GET, &format!("/v1/topics/{topic}")))
        .await
    {
        Ok(info) => Ok(Some(info.end_offsets)),
        Err(e) if is_status(&e, StatusCode::NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

fn cursors(offsets: impl Iterator<Item = u64>) -> String {
    offsets
        .enumerate()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One event as one JSON line, as the API answered it.
fn print(event: &EventView) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(event)?);
    Ok(())
}

/// Run `spate events tail`.
pub async fn tail(client: &ApiClient, args: TailArgs) -> anyhow::Result<()> {
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let topic = args.topic.as_str();
    let mut printed = 0usize;
    let ends = match end_offsets(client, topic).await? {
        Some(ends) => ends,
        None if args.follow => {
            eprintln!(
                "topic `{topic}` does not exist yet; waiting for its first event (Ctrl-C to stop)"
            );
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(POLL) => {}
                }
                if let Some(ends) = end_offsets(client, topic).await? {
                    break vec![0; ends.len()];
                }
            }
        }
        None => {
            anyhow::bail!("topic `{topic}` does not exist (yet): it is created by its first event")
        }
    };

    let mut from;
    if args.from_beginning {
        from = cursors(ends.iter().map(|_| 0));
        loop {
            let page = read_page(client, topic, &from).await?;
            from = page.next_from;
            if page.events.is_empty() {
                break;
            }
            for e in &page.events {
                print(e)?;
                printed += 1;
                if args.limit.is_some_and(|l| printed >= l) {
                    return Ok(());
                }
            }
        }
    } else {
        let n = args.limit.unwrap_or(10) as u64;
        from = cursors(ends.iter().map(|e| e.saturating_sub(n)));
        let mut backlog = Vec::new();
        loop {
            let page = read_page(client, topic, &from).await?;
            from = page.next_from;
            if page.events.is_empty() {
                break;
            }
            backlog.extend(page.events);
        }
        backlog.sort_by_key(|e: &EventView| (e.timestamp_ms, e.partition, e.offset));
        let skip = backlog.len().saturating_sub(n as usize);
        for e in &backlog[skip..] {
            print(e)?;
        }
    }
    if !args.follow {
        return Ok(());
    }
    loop {
        let page = read_page(client, topic, &from).await?;
        from = page.next_from;
        for e in &page.events {
            print(e)?;
            printed += 1;
            if args.from_beginning && args.limit.is_some_and(|l| printed >= l) {
                return Ok(());
            }
        }
        if page.events.is_empty() {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_malformed_line_is_named_and_nothing_is_sent() {
        let text = "{\"payload\":1}\n\n{\"payload\":2,\"colour\":\"red\"}\n";
        let err = parse_jsonl(text, Some("orders")).err().unwrap().to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("colour"), "{err}");
        let err = parse_jsonl("{\"payload\":1}\nnot json\n", Some("o"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = parse_jsonl("{\"payload\":1}\n", None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no `topic`"), "{err}");
    }

    #[test]
    fn batches_follow_topic_runs_and_size() {
        let mut text = String::new();
        for i in 0..1200 {
            let topic = if (500..510).contains(&i) { "b" } else { "a" };
            text.push_str(&format!("{{\"topic\":\"{topic}\",\"payload\":{i}}}\n"));
        }
        let b = batches(parse_jsonl(&text, None).unwrap());
        let shape: Vec<(&str, usize)> = b.iter().map(|(t, e)| (t.as_str(), e.len())).collect();
        assert_eq!(shape, vec![("a", 500), ("b", 10), ("a", 500), ("a", 190)]);
        assert_eq!(b[1].1[0].payload, Some(serde_json::json!(500)));
        let sent = serde_json::to_value(&b[1].1[0]).unwrap();
        assert!(sent.get("topic").is_none(), "{sent}");
    }
}
