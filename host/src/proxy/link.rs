//! Upstream connections maitre can give up on, and know when the upstream
//! has let go of them.
//!
//! A request maitre gives up on (pre-empted, cut, failed, or its client
//! gone) must free its slot only once the upstream has stopped working on
//! it, or the request started in its place finds the engine still full. So
//! every upstream connection comes from [`Connector`], which wraps the TCP
//! stream: a request's [`Link`] (captured from hyper's pool) can abandon the
//! connection, which poisons it (never reused) and closes it at once, and
//! when hyper drops it, maitre half-closes it and reads until the upstream
//! closes its end: the upstream has noticed and let go. That moment sets
//! the connection's [`LetGo`], bounded by [`LET_GO_TIMEOUT`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use http::{Request, Uri};
use hyper_util::client::legacy::connect::{
    CaptureConnection, Connected, Connection, HttpConnector, capture_connection,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::BoxError;
use crate::scheduler::{LET_GO_TIMEOUT, LetGo};

/// No kill requested.
const ALIVE: u64 = u64::MAX;

/// Hyper's HTTP connector, with every connection an [`Upstream`] one.
#[derive(Clone)]
pub(crate) struct Connector(pub(crate) HttpConnector);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(TokioIo::new(Stream::new(tcp)))
        })
    }
}

/// What a connection shares with whoever may abandon it.
#[derive(Debug, Default)]
struct Shared {
    /// Bytes written so far: a kill applies to the exchange it was asked
    /// for, not to a later request on the same connection.
    written: AtomicU64,
    /// `written` when a kill was asked for, or [`ALIVE`].
    kill_at: AtomicU64,
    /// Wakes a read waiting on the socket (an idle pooled connection).
    reader: AtomicWaker,
}

impl Shared {
    fn killed(&self) -> bool {
        let at = self.kill_at.load(Ordering::Acquire);
        at != ALIVE && at == self.written.load(Ordering::Acquire)
    }
}

/// An upstream connection as hyper's pool knows it (its `Connected` extra).
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    shared: Arc<Shared>,
    let_go: LetGo,
}

impl Upstream {
    /// Closes the connection now (unless another request has been sent on
    /// it since) and says when the upstream has let go of it.
    fn abandon(&self) -> LetGo {
        let s = &self.shared;
        s.kill_at
            .store(s.written.load(Ordering::Acquire), Ordering::Release);
        s.reader.wake();
        self.let_go.clone()
    }
}

/// A TCP connection to the upstream that can be killed, and that is let go
/// of politely when dropped (see the module doc).
pub(crate) struct Stream {
    tcp: Option<TcpStream>,
    up: Upstream,
}

impl Stream {
    fn new(tcp: TcpStream) -> Stream {
        Stream {
            tcp: Some(tcp),
            up: Upstream {
                shared: Arc::new(Shared {
                    kill_at: AtomicU64::new(ALIVE),
                    ..Shared::default()
                }),
                let_go: LetGo::new(),
            },
        }
    }

    fn tcp(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        if self.up.shared.killed() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "maitre gave up this upstream connection",
            ));
        }
        match &mut self.tcp {
            Some(t) => Ok(Pin::new(t)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        let c = self
            .tcp
            .as_ref()
            .map_or_else(Connected::new, TcpStream::connected);
        c.extra(self.up.clone())
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.up.shared.reader.register(cx.waker());
        match this.tcp() {
            Ok(t) => t.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = match this.tcp() {
            Ok(t) => t.poll_write(cx, b),
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Poll::Ready(Ok(n)) = r {
            this.up.shared.written.fetch_add(n as u64, Ordering::AcqRel);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().tcp() {
            Ok(t) => t.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().tcp.as_mut() {
            Some(t) => Pin::new(t).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let Some(tcp) = self.tcp.take() else {
            return;
        };
        let let_go = self.up.let_go.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(let_go_of(tcp, let_go));
            }
            Err(_) => let_go.set(),
        }
    }
}

/// Half-closes `tcp` and reads until the upstream closes its end (it has
/// noticed and let go), then sets `let_go`; gives up after
/// [`LET_GO_TIMEOUT`].
async fn let_go_of(mut tcp: TcpStream, let_go: LetGo) {
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 8192];
    let drained = tokio::time::timeout(LET_GO_TIMEOUT, async {
        while let Ok(n) = tcp.read(&mut sink).await
            && n > 0
        {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout_s = LET_GO_TIMEOUT.as_secs(),
            "the upstream kept a connection maitre gave up open; closed at maitre's end only"
        );
    }
    drop(tcp);
    let_go.set();
}

/// One request's view of the upstream connection hyper's pool gives it.
pub(crate) struct Link {
    capture: CaptureConnection,
    /// The connection's bytes written when the answer's head came (the
    /// request was sent whole by then), or [`ALIVE`] before.
    answered_at: AtomicU64,
}

impl Link {
    /// Captures the connection `req` will be sent on.
    pub(crate) fn capture<B>(req: &mut Request<B>) -> Arc<Link> {
        Arc::new(Link {
            capture: capture_connection(req),
            answered_at: AtomicU64::new(ALIVE),
        })
    }

    /// The answer's head came: from now on, a request written on the same
    /// connection is another one, which giving up this one must not touch.
    pub(crate) fn answered<B>(&self, resp: &http::Response<B>) {
        if let Some(up) = resp.extensions().get::<Upstream>() {
            let written = up.shared.written.load(Ordering::Acquire);
            self.answered_at.store(written, Ordering::Release);
        }
    }

    /// Gives up the request's connection: never reused, closed now. Returns
    /// when the upstream has let go of it; `None` when the request never got
    /// a connection, or when its exchange was over and the connection
    /// already carries another request.
    pub(crate) fn abandon(&self) -> Option<LetGo> {
        let meta = self.capture.connection_metadata();
        let c = meta.as_ref()?;
        let mut ext = http::Extensions::new();
        c.get_extras(&mut ext);
        let up = ext.get::<Upstream>()?;
        let at = self.answered_at.load(Ordering::Acquire);
        if at != ALIVE && up.shared.written.load(Ordering::Acquire) > at {
            return None;
        }
        c.poison();
        Some(up.abandon())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (Stream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (Stream::new(c), s)
    }

    #[tokio::test]
    async fn dropped_it_is_let_go_when_the_upstream_closes_its_end() {
        let (ours, mut theirs) = pair().await;
        let let_go = ours.up.let_go.clone();
        drop(ours);
        // The upstream sees our end of file but keeps writing a while.
        let mut b = [0u8; 16];
        assert_eq!(theirs.read(&mut b).await.unwrap(), 0);
        theirs.write_all(b"more").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!let_go.is_set(), "let go before the upstream closed");
        drop(theirs);
        tokio::time::timeout(Duration::from_secs(2), let_go.wait())
            .await
            .unwrap();
        assert!(let_go.is_set());
    }

    /// A server that answers every request on one kept-alive connection.
    async fn keep_alive_server() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while let Ok(n) = s.read(&mut chunk).await
                && n > 0
            {
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn giving_up_a_finished_exchange_spares_the_next_request_on_its_connection() {
        use http_body_util::{BodyExt, Empty};
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;

        let addr = keep_alive_server().await;
        let client: Client<Connector, Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build(Connector(HttpConnector::new()));
        let send = |link: &mut Option<Arc<Link>>| {
            let mut req = Request::get(format!("http://{addr}/"))
                .body(Empty::new())
                .unwrap();
            *link = Some(Link::capture(&mut req));
            client.request(req)
        };
        let mut first = None;
        let r = send(&mut first).await.unwrap();
        let first = first.unwrap();
        first.answered(&r);
        r.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut second = None;
        let r = send(&mut second).await.unwrap();
        let second = second.unwrap();
        second.answered(&r);
        // The same connection carries the second request now.
        assert!(first.abandon().is_none());
        let let_go = second.abandon().expect("the second request's connection");
        // Given up: closed at once, though its body was never read.
        tokio::time::timeout(Duration::from_secs(2), let_go.wait())
            .await
            .unwrap();
        assert!(let_go.is_set());
        drop(r);
    }

    #[tokio::test]
    async fn a_kill_fails_the_exchange_it_was_asked_for_only() {
        let (mut ours, _theirs) = pair().await;
        ours.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let up = ours.up.clone();
        up.abandon();
        let mut b = [0u8; 4];
        let e = ours.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        // Had another request been written since, it would live on.
        let (mut ours, _theirs) = pair().await;
        let up = ours.up.clone();
        up.abandon();
        ours.up.shared.written.fetch_add(1, Ordering::AcqRel);
        assert!(!ours.up.shared.killed());
        ours.write_all(b"x").await.unwrap();
    }
}
