//! Reads for the HTTP API (`GET /v1/topics/{topic}/events`): one partition from an offset,
//! on a consumer assigned per read.

use crate::backend_error;
use crate::bus::KafkaBus;
use crate::record::to_event;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use spate_core::types::Event;
use spate_core::{BackendError, BackendResult};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

impl KafkaBus {
    pub(crate) async fn read_partition(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> BackendResult<Vec<Event>> {
        let reader = Arc::clone(&self.reader);
        let timeout = self.opts.request_timeout;
        let name = topic.to_string();
        self.blocking(move || {
            let reader = reader
                .lock()
                .map_err(|_| BackendError::Unavailable("reader lock poisoned".into()))?;
            let (_, high) = reader
                .fetch_watermarks(&name, partition as i32, timeout)
                .map_err(|e| backend_error(e, Some(&name)))?;
            let high = high.max(0) as u64;
            if from >= high || max == 0 {
                return Ok(Vec::new());
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&name, partition as i32, Offset::Offset(from as i64))
                .map_err(|e| backend_error(e, Some(&name)))?;
            reader
                .assign(&tpl)
                .map_err(|e| backend_error(e, Some(&name)))?;
            let mut out = Vec::new();
            let deadline = Instant::now() + timeout;
            while out.len() < max && Instant::now() < deadline {
                match reader.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let e = to_event(&m);
                        let done = e.offset + 1 >= high;
                        if e.offset >= from {
                            out.push(e);
                        }
                        if done {
                            break;
                        }
                    }
                    Some(Err(e)) => warn!(error = %e, "read failed; retrying"),
                    None => {}
                }
            }
            let _ = reader.unassign();
            Ok(out)
        })
        .await
    }
}
