//! Serving the API on a TCP listener: one hyper HTTP/1.1 connection per accepted socket,
//! with what the router cannot see — a request head that never completes, a connection
//! left idle, a shutdown that must not wait on either — and hyper's own answers to
//! requests it cannot parse (400, 414, 431) rewritten as the API's JSON errors.
//!
//! What a request does is [`crate::api::router`]'s job; this module owns connections only.
//!
//! The timeouts are ours rather than hyper's `header_read_timeout`: hyper starts that timer
//! when it begins waiting for a head, idle or not, so one setting would govern both a
//! slow head and a keep-alive connection between requests. Like Go's `net/http`
//! (`ReadHeaderTimeout` and `IdleTimeout`) a connection here is either
//! - **idle** (connected, or its last response is out): closed once no byte has moved for
//!   the idle timeout — which also closes a client that stops reading a response;
//! - **reading a head** (its first byte arrived): closed unless the head is complete
//!   within the header-read timeout;
//! - **busy** (the router has the request): bounded by the router's own time limits.

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::Service as _;

/// Connection limits (`api.header-read-timeout-ms`, `api.idle-timeout-ms`,
/// `api.shutdown-grace-ms`).
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// From a request's first byte to the end of its head.
    pub header_read: Duration,
    /// Longest time no byte moves on a connection that holds no request.
    pub idle: Duration,
    /// After the shutdown signal, how long open connections may finish their requests
    /// before they are dropped.
    pub shutdown_grace: Duration,
}

/// Serve `app` on `listener` until `shutdown` completes; then stop accepting, let open
/// connections finish their requests (idle ones close at once) for at most
/// `limits.shutdown_grace`, and drop whatever is still open.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let stop = CancellationToken::new();
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, app.clone(), limits, stop.clone()));
                }
                // Out of file descriptors and the like: the listener stays usable, and
                // retrying at once would spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    stop.cancel();
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            grace_ms = limits.shutdown_grace.as_millis() as u64,
            "connections still open after the shutdown grace period (api.shutdown-grace-ms); dropping them"
        );
        conns.shutdown().await;
    }
    Ok(())
}

async fn connection(stream: TcpStream, app: Router, limits: ConnLimits, stop: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let requests = Arc::new(Requests::default());
    let io = TokioIo::new(Guarded::new(stream, limits, Arc::clone(&requests)));
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        requests.started.fetch_add(1, Ordering::AcqRel);
        let call = app.clone().call(req.map(Body::new));
        let requests = Arc::clone(&requests);
        async move {
            let res = call.await;
            requests.finished.fetch_add(1, Ordering::AcqRel);
            res
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // `Guarded` times heads and idle connections (see the module docs).
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Requests of one connection the router started and finished.
#[derive(Default)]
struct Requests {
    started: AtomicU64,
    finished: AtomicU64,
}

/// Where a connection is, for its timeouts (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Head,
    Busy,
}

/// A TCP stream that enforces the idle and header-read timeouts and rewrites hyper's
/// automatic error answers.
struct Guarded {
    stream: TcpStream,
    limits: ConnLimits,
    requests: Arc<Requests>,
    /// `requests.finished` when the phase was last brought up to date.
    finished_seen: u64,
    phase: Phase,
    /// When the current phase's clock started: the last byte moved (idle) or the head's
    /// first byte (head).
    since: Instant,
    timer: Pin<Box<Sleep>>,
    /// A JSON answer being written in place of hyper's empty one.
    rewrite: Option<Rewrite>,
}

struct Rewrite {
    answer: Vec<u8>,
    written: usize,
    /// Bytes of hyper's answer it replaces.
    replaces: usize,
}

impl Guarded {
    fn new(stream: TcpStream, limits: ConnLimits, requests: Arc<Requests>) -> Self {
        let now = Instant::now();
        Self {
            stream,
            limits,
            requests,
            finished_seen: 0,
            phase: Phase::Idle,
            since: now,
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle)),
            rewrite: None,
        }
    }

    /// Follow the router: busy while it holds a request, idle from the moment it
    /// returned (a quick handler may start and finish between two looks).
    fn sync_phase(&mut self) {
        let finished = self.requests.finished.load(Ordering::Acquire);
        if self.requests.started.load(Ordering::Acquire) > finished {
            self.phase = Phase::Busy;
        } else if finished != self.finished_seen {
            self.finished_seen = finished;
            self.phase = Phase::Idle;
            self.since = Instant::now();
        }
    }

    /// Bytes moved: an idle connection's clock restarts; a first byte starts a head.
    fn moved(&mut self, read: bool) {
        match self.phase {
            Phase::Idle if read => {
                self.phase = Phase::Head;
                self.since = Instant::now();
            }
            Phase::Idle => self.since = Instant::now(),
            Phase::Head | Phase::Busy => {}
        }
    }

    /// Called when the stream has nothing to give or take: an error once the phase's
    /// time is up, else the timer is armed to wake the connection when it will be.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let (limit, what) = match self.phase {
            Phase::Busy => return Ok(()),
            Phase::Idle => (
                self.limits.idle,
                "connection idle for longer than api.idle-timeout-ms",
            ),
            Phase::Head => (
                self.limits.header_read,
                "request head not complete within api.header-read-timeout-ms",
            ),
        };
        let deadline = self.since + limit;
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, what));
        }
        Ok(())
    }

    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(r) = self.rewrite.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        while r.written < r.answer.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &r.answer[r.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => r.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let replaces = r.replaces;
        self.rewrite = None;
        Poll::Ready(Ok(replaces))
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.sync_phase();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.moved(true);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.poll_expired(cx)?;
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.sync_phase();
        if this.rewrite.is_some() {
            return this.poll_rewrite(cx);
        }
        let mut len = buf.len();
        // hyper answers a head it cannot parse itself, before the router sees it, so such
        // an answer is only ever written while a head is being read.
        if this.phase == Phase::Head
            && let Some(found) = automatic_answer(buf)
        {
            if found.at == 0 {
                this.rewrite = Some(Rewrite {
                    answer: found.json,
                    written: 0,
                    replaces: found.len,
                });
                return this.poll_rewrite(cx);
            }
            len = found.at;
        }
        match Pin::new(&mut this.stream).poll_write(cx, &buf[..len]) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.moved(false);
                }
                // hyper may have polled the read side for the next head while the
                // router still had this request; arm the idle clock now, as nothing
                // else will. Expiry is reported by the next read.
                let _ = this.poll_expired(cx);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.poll_expired(cx)?;
                Poll::Pending
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.sync_phase();
        if this.rewrite.is_some() {
            ready!(this.poll_rewrite(cx))?;
        }
        ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        let _ = this.poll_expired(cx);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// hyper's automatic answer found in a write: where it starts, how long it is, and the
/// JSON answer that replaces it.
struct Found {
    at: usize,
    len: usize,
    json: Vec<u8>,
}

/// hyper's answers to a head it cannot parse: an empty body (`content-length: 0`), so the
/// API's JSON answer replaces the whole head. No body of this API holds a raw CR LF
/// (JSON escapes it), so a status line after one can only be a response's.
fn automatic_answer(buf: &[u8]) -> Option<Found> {
    const ANSWERS: &[(&str, &str, &str)] = &[
        (
            "HTTP/1.1 414 URI Too Long\r\n",
            "uri_too_long",
            "the request URI is longer than 65534 bytes; read with fewer `from` cursors per request",
        ),
        (
            "HTTP/1.1 431 Request Header Fields Too Large\r\n",
            "headers_too_large",
            "the request head (request line and headers) is too large or has too many headers",
        ),
        (
            "HTTP/1.1 400 Bad Request\r\n",
            "bad_request",
            "the request is not valid HTTP/1.1",
        ),
    ];
    for (status_line, code, message) in ANSWERS {
        let line = status_line.as_bytes();
        let Some(at) = find(buf, line) else {
            continue;
        };
        let head_len = find(&buf[at..], b"\r\n\r\n")? + 4;
        let head = &buf[at..at + head_len];
        if find(head, b"content-length: 0\r\n").is_none() {
            continue;
        }
        let body = json!({ "error": { "code": code, "message": message } }).to_string();
        let json = format!(
            "{}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            status_line,
            body.len()
        )
        .into_bytes();
        return Some(Found {
            at,
            len: head_len,
            json,
        });
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn hypers_empty_414_becomes_json_and_a_routers_answer_is_kept() {
        let canned = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let found = automatic_answer(canned).unwrap();
        assert_eq!((found.at, found.len), (0, canned.len()));
        let text = String::from_utf8(found.json).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\n")
        );
        assert!(text.ends_with(r#"{"error":{"code":"uri_too_long","message":"the request URI is longer than 65534 bytes; read with fewer `from` cursors per request"}}"#));

        // After the tail of an earlier response.
        let mut two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
        two.extend_from_slice(canned);
        assert!(automatic_answer(&two).is_some_and(|f| f.at == two.len() - canned.len()));

        // The router's own 400 has a JSON body: left alone.
        let routed = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{\"a\":\"b\"}";
        assert!(automatic_answer(routed).is_none());
    }
}
