//! Record encoding: version byte, timestamp, key, payload, headers; lengths as u32 LE.

use super::*;

pub(super) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> BackendResult<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| BackendError::Invalid("an event field is larger than 4 GiB".into()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

pub(super) fn encode_record(event: &NewEvent, timestamp_ms: i64) -> BackendResult<Vec<u8>> {
    let size = 1
        + 8
        + 5
        + event.key.as_ref().map_or(0, Vec::len)
        + 4
        + event.payload.len()
        + 4
        + event
            .headers
            .iter()
            .map(|h| 8 + h.name.len() + h.value.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(RECORD_V1);
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    match &event.key {
        None => out.push(0),
        Some(key) => {
            out.push(1);
            put_bytes(&mut out, key)?;
        }
    }
    put_bytes(&mut out, &event.payload)?;
    let count = u32::try_from(event.headers.len())
        .map_err(|_| BackendError::Invalid("too many headers".into()))?;
    out.extend_from_slice(&count.to_le_bytes());
    for h in &event.headers {
        put_bytes(&mut out, h.name.as_bytes())?;
        put_bytes(&mut out, &h.value)?;
    }
    Ok(out)
}

pub(super) struct RecordReader<'a> {
    pub(super) buf: &'a [u8],
}

impl<'a> RecordReader<'a> {
    fn take(&mut self, n: usize) -> BackendResult<&'a [u8]> {
        if self.buf.len() < n {
            return Err(BackendError::Corrupt("truncated event record".into()));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> BackendResult<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn bytes(&mut self) -> BackendResult<&'a [u8]> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        self.take(len)
    }
}

pub(super) fn decode_event(
    topic: &str,
    partition: u32,
    offset: u64,
    record: &[u8],
) -> BackendResult<Event> {
    let mut r = RecordReader { buf: record };
    let [version] = r.array()?;
    if version != RECORD_V1 {
        return Err(BackendError::Corrupt(format!(
            "unknown event record version {version}"
        )));
    }
    let timestamp_ms = i64::from_le_bytes(r.array()?);
    let key = match r.array()? {
        [0] => None,
        [1] => Some(r.bytes()?.to_vec()),
        [flag] => {
            return Err(BackendError::Corrupt(format!(
                "bad key flag {flag} in event record"
            )));
        }
    };
    let payload = r.bytes()?.to_vec();
    let count = u32::from_le_bytes(r.array()?) as usize;
    // The count is untrusted: reserve only what the remaining bytes could hold.
    let mut headers = Vec::with_capacity(count.min(r.buf.len() / 8));
    for _ in 0..count {
        let name = std::str::from_utf8(r.bytes()?)
            .map_err(|_| BackendError::Corrupt("header name is not UTF-8".into()))?
            .to_owned();
        let value = r.bytes()?.to_vec();
        headers.push(Header { name, value });
    }
    if !r.buf.is_empty() {
        return Err(BackendError::Corrupt(
            "trailing bytes after event record".into(),
        ));
    }
    Ok(Event {
        topic: topic.to_owned(),
        partition,
        offset,
        key,
        payload,
        headers,
        timestamp_ms,
    })
}

/// A half-open offset range `[from, to)` of one partition to read.
#[derive(Clone, Debug)]
pub(super) struct FetchRange {
    pub(super) topic: String,
    pub(super) partition: u32,
    pub(super) from: u64,
    pub(super) to: u64,
}

/// Reads `ranges` in one snapshot, each in offset order, in the order given, stopping
/// after the event that takes the total past `max_bytes` (so one event is always read).
/// Returns the events and whether the byte bound cut the read short.
pub(super) fn read_ranges(
    db: &Database,
    ranges: &[FetchRange],
    max_bytes: usize,
) -> BackendResult<(Vec<Event>, bool)> {
    let txn = db.begin_read().map_err(redb_error)?;
    let table = txn.open_table(EVENTS).map_err(redb_error)?;
    let total: u64 = ranges.iter().map(|r| r.to.saturating_sub(r.from)).sum();
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0).min(4096));
    let mut bytes = 0usize;
    for r in ranges {
        let topic = r.topic.as_str();
        let rows = table
            .range((topic, r.partition, r.from)..(topic, r.partition, r.to))
            .map_err(redb_error)?;
        for row in rows {
            if bytes > max_bytes {
                return Ok((out, true));
            }
            let (key, value) = row.map_err(redb_error)?;
            let (_, _, offset) = key.value();
            let record = value.value();
            bytes = bytes.saturating_add(record.len());
            out.push(decode_event(topic, r.partition, offset, record)?);
        }
    }
    Ok((out, false))
}
