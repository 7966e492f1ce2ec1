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

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, Request, Version};
use axum::serve::{Listener, ListenerExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn, Instrument};

use crate::access::Access;
use crate::auth::BearerToken;
use crate::routes::stream::{SseFeed, SSE_CONTENT_TYPE};
use crate::{routes, AppState};

/// A request head larger than this is never a stream request worth sniffing; axum takes it.
const MAX_HEAD: usize = 4096;
/// A connection that sends nothing this long is handed to axum, whose timeouts apply.
const FIRST_BYTES: Duration = Duration::from_secs(10);
/// A stream client that takes no data for this long is cut off rather than held.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections accepted but not yet taken by axum; accepting waits when it is full.
const HANDOFF_QUEUE: usize = 1024;

/// Serves the API on an open listener; returns only if axum's server stops.
///
/// Nagle's algorithm is off on every connection: a stream event is a small write with nothing
/// coming back, and Nagle would hold it until the client's delayed ACK (up to 40 ms).
pub async fn serve(listener: TcpListener, state: AppState) -> io::Result<()> {
    let local_addr = listener.local_addr()?;
    let (handoff, incoming) = mpsc::channel(HANDOFF_QUEUE);
    tokio::spawn(accept(listener, state.clone(), handoff));
    // Through `tap_io`, axum gives handlers the peer address of any listener's connections.
    let incoming = Incoming {
        incoming,
        local_addr,
    }
    .tap_io(|_| {});
    let app = routes::router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(incoming, app).await
}

/// The connections axum serves: all but the direct streams.
struct Incoming {
    incoming: mpsc::Receiver<(TcpStream, SocketAddr)>,
    local_addr: SocketAddr,
}

impl Listener for Incoming {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
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
    handoff: mpsc::Sender<(TcpStream, SocketAddr)>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(cause = %e, "could not set TCP_NODELAY");
        }
        let (state, handoff) = (state.clone(), handoff.clone());
        tokio::spawn(async move {
            if let Some(tcp) = serve_stream(tcp, peer, state).await {
                let _ = handoff.send((tcp, peer)).await;
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
    let mut out = Vec::new();
    let mut probe = [0u8; 16];
    loop {
        let next = tokio::select! {
            text = feed.next_text() => text,
            // A stream client sends nothing more: end of file, an error or bytes all mean the
            // connection is over.
            _ = from_client.read(&mut probe) => break,
        };
        let Some(text) = next else {
            out.extend_from_slice(b"0\r\n\r\n");
            let _ = write_all(&mut to_client, &out).await;
            break;
        };
        out.extend_from_slice(format!("{:x}\r\n", text.len()).as_bytes());
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !write_all(&mut to_client, &out).await {
            break;
        }
        out = Vec::new();
    }
    debug!("stream closed");
}

async fn write_all(to: &mut tokio::net::tcp::WriteHalf<'_>, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, to.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
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
