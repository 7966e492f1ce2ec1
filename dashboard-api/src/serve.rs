//! The HTTP server. Every connection is served by axum, except one that opens with a
//! live-stream request (`GET /api/v1/stream`): once that request is authorized, its events
//! are written straight to the socket.
//!
//! Why: a stream client holds its connection for hours and receives small events. Through
//! hyper, each such connection keeps a read buffer and a write buffer of 8 KiB each whatever
//! it sends, which makes hyper alone most of a stream client's memory. Written directly, a
//! client costs its queue, its filter and a small task. The request is parsed from a peek at
//! the socket and authorized with the same extractors as the route; a request that is not a
//! complete stream request, or that the route would refuse, is handed to axum untouched,
//! which answers it (with its 4xx) exactly as before. Streams on a connection that carried
//! other requests first go through axum too.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, Request, Version};
use axum::serve::{Listener, ListenerExt};
use telemon_model::metrics;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn, Instrument};

use crate::access::Access;
use crate::auth::BearerToken;
use crate::routes::stream::{SseFeed, SSE_CONTENT_TYPE};
use crate::{routes, AppState};

/// A request head larger than this is never a stream request worth sniffing; axum takes it.
const MAX_HEAD: usize = 4096;
/// A connection that sends nothing this long is handed to axum, whose timeouts apply.
const FIRST_BYTES: Duration = Duration::from_secs(10);
/// A connection that makes no progress either way for this long is closed: an idle
/// keep-alive connection, a request head that never completes, a stream client that takes
/// no data. Streams send a heartbeat well inside it.
const STALLED: Duration = Duration::from_secs(30);
/// Connections accepted but not yet taken by axum; accepting waits when it is full.
const HANDOFF_QUEUE: usize = 1024;
/// At most this many HTTP connections at once (fewer under a low open-file limit): the
/// descriptors they use are shared with the device edge, ingest's spool and the store, which
/// idle HTTP clients must not be able to starve.
const MAX_CONNECTIONS: usize = 1024;

/// Serves the API on an open listener; returns only if axum's server stops.
///
/// Nagle's algorithm is off on every connection: a stream event is a small write with nothing
/// coming back, and Nagle would hold it until the client's delayed ACK (up to 40 ms).
pub async fn serve(listener: TcpListener, state: AppState) -> io::Result<()> {
    let local_addr = listener.local_addr()?;
    let (handoff, incoming) = mpsc::channel(HANDOFF_QUEUE);
    let slots = Arc::new(Semaphore::new(connection_limit()));
    tokio::spawn(accept(listener, state.clone(), handoff, slots));
    // Through `tap_io`, axum gives handlers the peer address of any listener's connections.
    let incoming = Incoming {
        incoming,
        local_addr,
    }
    .tap_io(|_| {});
    let app = routes::router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(incoming, app).await
}

/// [`MAX_CONNECTIONS`], or a quarter of the open-file limit (raised as far as it goes) when
/// that is lower.
fn connection_limit() -> usize {
    let limit = telemon_model::limits::raise_open_files();
    MAX_CONNECTIONS.min((limit / 4).max(16) as usize)
}

/// The connections axum serves: all but the direct streams.
struct Incoming {
    incoming: mpsc::Receiver<(Guarded, SocketAddr)>,
    local_addr: SocketAddr,
}

impl Listener for Incoming {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        match self.incoming.recv().await {
            Some(connection) => connection,
            // The accept loop never ends; if it did, there is nothing more to serve.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

async fn accept(
    listener: TcpListener,
    state: AppState,
    handoff: mpsc::Sender<(Guarded, SocketAddr)>,
    slots: Arc<Semaphore>,
) {
    let refused = metrics::counter(
        "telemon_api_connections_refused_total",
        "HTTP connections closed at once because the connection limit was reached.",
        &[],
    );
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.inc();
            debug!(%peer, "HTTP connection limit reached; closing");
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(cause = %e, "could not set TCP_NODELAY");
        }
        let (state, handoff) = (state.clone(), handoff.clone());
        tokio::spawn(async move {
            if let Some(tcp) = serve_stream(tcp, peer, state).await {
                let _ = handoff.send((Guarded::new(tcp, slot), peer)).await;
            }
        });
    }
}

/// Out of file descriptors, typically: waiting lets connections close before the next try,
/// where retrying at once would spin.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    warn!(cause = %e, "HTTP accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Serves the connection as a direct stream if it opens with an authorized stream request;
/// otherwise gives it back, unread, for axum.
async fn serve_stream(tcp: TcpStream, peer: SocketAddr, state: AppState) -> Option<TcpStream> {
    let mut head = vec![0u8; MAX_HEAD];
    let Ok(Ok(seen)) = tokio::time::timeout(FIRST_BYTES, tcp.peek(&mut head)).await else {
        return Some(tcp);
    };
    let Some((mut parts, head_len)) = stream_request(&head[..seen], peer) else {
        return Some(tcp);
    };
    drop(head);

    let feed = match open(&mut parts, state).await {
        Some(feed) => feed,
        None => return Some(tcp),
    };
    let span = tracing::debug_span!("stream", %peer);
    write_stream(tcp, head_len, feed).instrument(span).await;
    None
}

/// The request at the start of `bytes`, if it is a complete `GET /api/v1/stream` with no body
/// and nothing to negotiate, with the length of its head.
fn stream_request(bytes: &[u8], peer: SocketAddr) -> Option<(Parts, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head_len) = parsed.parse(bytes).ok()? else {
        return None;
    };
    let path = parsed.path?;
    let route = path.split('?').next()?;
    if parsed.method != Some("GET") || route != "/api/v1/stream" || parsed.version != Some(1) {
        return None;
    }

    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11);
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        // A body, an upgrade or an expectation is for the general server to handle.
        let general = ["content-length", "transfer-encoding", "upgrade", "expect"];
        if general.contains(&name.as_str()) {
            return None;
        }
        request = request.header(name, HeaderValue::from_bytes(header.value).ok()?);
    }
    let (mut parts, ()) = request.body(()).ok()?.into_parts();
    parts.extensions.insert(ConnectInfo(peer));
    Some((parts, head_len))
}

/// Authorizes and opens the stream as the route would; `None` leaves the answer to axum.
async fn open(parts: &mut Parts, state: AppState) -> Option<SseFeed> {
    let access = Access::from_request_parts(parts, &state).await.ok()?;
    let token = BearerToken::from_request_parts(parts, &state).await.ok()?;
    let Query(params) = Query::try_from_uri(&parts.uri).ok()?;
    SseFeed::open(state, access, token, params, &parts.headers)
        .await
        .ok()
}

async fn write_stream(mut tcp: TcpStream, head_len: usize, mut feed: SseFeed) {
    // The request head was only peeked at: take it off the socket now.
    let mut head = vec![0u8; head_len];
    if tcp.read_exact(&mut head).await.is_err() {
        return;
    }
    drop(head);
    debug!("stream opened");

    let (mut from_client, mut to_client) = tcp.split();
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {SSE_CONTENT_TYPE}\r\ncache-control: no-cache\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    // The head goes out at once: a client waits for it before it reads any event.
    if !write_all(&mut to_client, response.as_bytes()).await {
        return;
    }
    let mut probe = [0u8; 16];
    loop {
        let next = tokio::select! {
            text = feed.next_text() => text,
            // A stream client sends nothing more: end of file, an error or bytes all mean the
            // connection is over.
            _ = from_client.read(&mut probe) => break,
        };
        let Some(text) = next else {
            // The stream ended (its credential did): the last, empty chunk closes the body.
            let _ = write_all(&mut to_client, b"0\r\n\r\n").await;
            break;
        };
        let chunk = format!("{:x}\r\n{text}\r\n", text.len());
        if !write_all(&mut to_client, chunk.as_bytes()).await {
            break;
        }
    }
    debug!("stream closed");
}

async fn write_all(to: &mut tokio::net::tcp::WriteHalf<'_>, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(STALLED, to.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// A connection served by axum, closed with `TimedOut` once it makes no progress either way
/// for [`STALLED`] (hyper, as axum runs it, has no timeouts of its own), and holding its slot
/// under the connection limit until it is dropped.
struct Guarded {
    tcp: TcpStream,
    stalled: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Guarded {
    fn new(tcp: TcpStream, slot: OwnedSemaphorePermit) -> Guarded {
        Guarded {
            tcp,
            stalled: Box::pin(tokio::time::sleep(STALLED)),
            _slot: slot,
        }
    }

    fn progressed(&mut self) {
        let deadline = tokio::time::Instant::now() + STALLED;
        self.stalled.as_mut().reset(deadline);
    }

    /// What a pending read or write turns into: still pending, or an error once stalled.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Passes on the outcome of a write, counting written bytes as progress.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match poll {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    self.progressed();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.pending(cx),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.progressed();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.pending(cx),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_write(cx, bytes);
        this.wrote(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.wrote(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_makes_no_progress_is_closed_and_frees_its_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let slots = Arc::new(Semaphore::new(1));
        let mut guarded = Guarded::new(server, slots.clone().try_acquire_owned().unwrap());

        // The client sends a little, then nothing: the read after it times out.
        let mut client = client;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 16);
        let started = tokio::time::Instant::now();
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= STALLED);

        assert_eq!(slots.available_permits(), 0);
        drop(guarded);
        assert_eq!(slots.available_permits(), 1, "the slot is free again");
    }

    #[test]
    fn only_complete_plain_stream_requests_are_served_directly() {
        let good = b"GET /api/v1/stream?device=bed-1 HTTP/1.1\r\nHost: x\r\n\
                     Authorization: Bearer t\r\n\r\nextra";
        let (parts, len) = stream_request(good, peer()).expect("a stream request");
        assert_eq!(len, good.len() - "extra".len());
        assert_eq!(parts.uri.query(), Some("device=bed-1"));
        assert_eq!(parts.headers["authorization"], "Bearer t");
        assert!(parts.extensions.get::<ConnectInfo<SocketAddr>>().is_some());

        let refused: [&[u8]; 7] = [
            b"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\n",
            b"POST /api/v1/stream HTTP/1.1\r\n\r\n",
            b"GET /api/v1/streams HTTP/1.1\r\n\r\n",
            b"GET /api/v1/devices HTTP/1.1\r\n\r\n",
            b"GET /api/v1/stream HTTP/1.0\r\n\r\n",
            b"GET /api/v1/stream HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /api/v1/stream HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        ];
        for bytes in refused {
            assert!(
                stream_request(bytes, peer()).is_none(),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert!(stream_request(b"\x16\x03\x01garbage", peer()).is_none());
    }
}
