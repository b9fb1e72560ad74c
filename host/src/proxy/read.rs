//! Reading a scheduled request's body into memory of its own, within the
//! per-request limit (`limits.max_body_bytes`), the global budget
//! (`limits.max_total_body_bytes`) and the read timeout.
//!
//! Each chunk is copied out of hyper's read buffer as it arrives, into one
//! buffer sized by `Content-Length` when there is one (else grown, never
//! past `max_body_bytes`), so a waiting body holds exactly its own bytes and
//! not the connection buffers it arrived in.
//!
//! A body refused before it was read whole is [`discard`]ed for a moment:
//! a client sends its body without waiting for an answer, and a connection
//! closed with unread bytes is reset, which can destroy the refusal before
//! the client reads it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

use super::budget::{BodyBudget, Held, Spent};
use super::refusal::Refusal;

/// The limits a body is read within.
pub(super) struct BodyLimits {
    /// Largest body of one request (413 beyond).
    pub(super) max_bytes: usize,
    /// The whole body must arrive within this (408 beyond).
    pub(super) timeout: Duration,
}

/// How long a refused request's body is read and thrown away, so that the
/// client reads the refusal instead of a reset connection.
pub(super) const DISCARD_FOR: Duration = Duration::from_secs(2);

/// Reads `body` whole, reserving its bytes in `budget` before they are read:
/// a declared length at once (refused before a byte is read when it is over
/// the limit or the budget), a chunked body chunk by chunk.
pub(super) async fn read_body<B>(
    body: &mut B,
    limits: &BodyLimits,
    budget: &Arc<BodyBudget>,
) -> Result<(Bytes, Held), Refusal>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let declared = body.size_hint().exact().map(|n| n as usize);
    let too_large = Refusal::BodyTooLarge {
        limit: limits.max_bytes,
    };
    if declared.is_some_and(|n| n > limits.max_bytes) {
        return Err(too_large);
    }
    let mut held = budget.start();
    held.grow(declared.unwrap_or(0)).map_err(spent)?;
    let read = fill(body, declared, limits.max_bytes, &mut held);
    match tokio::time::timeout(limits.timeout, read).await {
        Ok(Ok(buf)) => {
            held.fit(buf.len());
            Ok((Bytes::from(buf), held))
        }
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => Err(Refusal::BodyTimeout {
            seconds: limits.timeout.as_secs(),
        }),
    }
}

/// The body's bytes in one buffer whose capacity is its length.
async fn fill<B>(
    body: &mut B,
    declared: Option<usize>,
    max: usize,
    held: &mut Held,
) -> Result<Vec<u8>, Refusal>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf: Vec<u8> = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Refusal::BodyUnreadable {
            detail: e.to_string(),
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        let len = buf.len() + chunk.len();
        if len > max {
            return Err(Refusal::BodyTooLarge { limit: max });
        }
        if len > buf.capacity() {
            // Doubling, but never past the per-request limit; what the
            // buffer may take is reserved before it grows.
            let cap = len.max(buf.capacity() * 2).min(max);
            held.grow(cap - buf.capacity()).map_err(spent)?;
            buf.reserve_exact(cap - buf.len());
        }
        buf.extend_from_slice(&chunk);
    }
    buf.shrink_to_fit();
    Ok(buf)
}

/// Reads what is left of a refused request's body and throws it away, in a
/// task of its own for at most [`DISCARD_FOR`] (one chunk in memory at a
/// time); then the body is dropped, which closes the connection.
pub(super) fn discard<B>(mut body: B)
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    if body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let drain = async { while let Some(Ok(_)) = body.frame().await {} };
        let _ = tokio::time::timeout(DISCARD_FOR, drain).await;
    });
}

fn spent(s: Spent) -> Refusal {
    Refusal::BodyBudgetSpent { limit: s.limit }
}

#[cfg(test)]
mod tests {
    use futures_util::stream;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};

    use super::*;
    use crate::metrics::Metrics;

    /// The refusal of a read that must fail.
    fn refused(r: Result<(Bytes, Held), Refusal>) -> Refusal {
        match r {
            Ok((bytes, _)) => panic!("read {} bytes, expected a refusal", bytes.len()),
            Err(e) => e,
        }
    }

    fn limits(max_bytes: usize) -> BodyLimits {
        BodyLimits {
            max_bytes,
            timeout: Duration::from_secs(5),
        }
    }

    /// A body without a declared length, in these chunks.
    fn chunked(
        chunks: &[&'static [u8]],
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>>>
    {
        let frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    #[tokio::test]
    async fn a_declared_body_is_read_into_exactly_its_size() {
        let budget = BodyBudget::new(1000, Arc::new(Metrics::new()));
        let (bytes, held) = read_body(
            &mut Full::new(Bytes::from_static(b"hello")),
            &limits(10),
            &budget,
        )
        .await
        .unwrap();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(budget.held(), 5);
        drop((bytes, held));
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_declared_body_over_the_limit_or_the_budget_is_refused_unread() {
        let budget = BodyBudget::new(8, Arc::new(Metrics::new()));
        let big = Full::new(Bytes::from_static(b"0123456789"));
        let e = refused(read_body(&mut big.clone(), &limits(9), &budget).await);
        assert_eq!(e, Refusal::BodyTooLarge { limit: 9 });
        let e = refused(read_body(&mut big.clone(), &limits(10), &budget).await);
        assert_eq!(e, Refusal::BodyBudgetSpent { limit: 8 });
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_chunked_body_is_reserved_as_it_arrives_and_fits_at_the_end() {
        let budget = BodyBudget::new(100, Arc::new(Metrics::new()));
        let mut body = chunked(&[b"abc", b"defgh", b"ij"]);
        let (bytes, held) = read_body(&mut body, &limits(50), &budget).await.unwrap();
        assert_eq!(&bytes[..], b"abcdefghij");
        assert_eq!(budget.held(), 10);
        drop(held);
        assert_eq!(budget.held(), 0);
        // Over the limit part-way: 413, nothing left held.
        let e =
            refused(read_body(&mut chunked(&[b"abcdef", b"ghijkl"]), &limits(8), &budget).await);
        assert_eq!(e, Refusal::BodyTooLarge { limit: 8 });
        // Over the budget part-way: 503, nothing left held.
        let small = BodyBudget::new(6, Arc::new(Metrics::new()));
        let e = refused(read_body(&mut chunked(&[b"abcd", b"efgh"]), &limits(50), &small).await);
        assert_eq!(e, Refusal::BodyBudgetSpent { limit: 6 });
        assert_eq!((budget.held(), small.held()), (0, 0));
    }
}
