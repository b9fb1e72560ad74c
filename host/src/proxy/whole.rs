//! The answer of a client that asked for no stream, built from the stream
//! maitre asked the upstream for (`rewrite`, `aggregate`).
//!
//! The stream is read to its end while the request is still pre-emptible:
//! nothing has reached the client, so a pre-emption drops the stream (which
//! closes the upstream connection, and so stops the generation even on
//! engines that only notice a disconnect while streaming) and requeues the
//! request, as before its first byte. Every chunk counts towards the
//! request's `tokens`, as a relayed stream's do, so a policy sees how far it
//! got and `maitre_preempted_tokens_total` counts the work thrown away.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::response::Parts;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::aggregate::{Api, Folded, Partial, Reader};
use super::headers::strip_hop_by_hop;
use super::refusal::Refusal;
use super::{Grant, Outcome, ProxyBody, Run, Ticket};
use crate::escape::Escaped;

/// What reading an upstream stream to its end came to.
pub(super) enum Whole {
    /// The policy pre-empted the request meanwhile; the stream was dropped.
    /// What a resumed generation could continue from ([`Partial`]).
    Preempted(Option<Partial>),
    /// The stream, folded (an answer, an error answer, or a broken stream).
    Folded(Parts, Folded),
    /// The upstream connection failed mid-stream: the error.
    Lost(String),
}

/// Whether `resp` is the stream of `api` that [`read`] folds: a 200 in the
/// API's framing. Anything else (an error answered before the first token,
/// a preload's single object) is relayed as it is.
pub(super) fn folds(resp: &Response<Incoming>, api: Api) -> bool {
    let framing = super::body::Framing::of(
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    resp.status() == StatusCode::OK && framing == api.framing()
}

/// Reads the upstream's stream to its end, unless the policy pre-empts the
/// request first; each chunk counts as a token of `run`. `seed`: the answer
/// so far of the pre-empted generation this stream continues.
pub(super) async fn read(
    resp: Response<Incoming>,
    api: Api,
    run: &Run,
    seed: Option<&Partial>,
) -> Whole {
    let (parts, body) = resp.into_parts();
    let mut reader = Reader::new(api, seed, || run.add_token());
    let read = tokio::select! {
        biased;
        _ = run.preempt.cancelled() => None,
        r = reader.read(body) => Some(r),
    };
    match read {
        None => Whole::Preempted(reader.partial()),
        Some(Ok(Some(decided))) => Whole::Folded(parts, decided),
        Some(Ok(None)) => Whole::Folded(parts, reader.end()),
        Some(Err(e)) => Whole::Lost(e),
    }
}

/// The client's answer: the folded body with the upstream's headers (its
/// `Content-Type` the one the upstream gives a non-streamed answer) and
/// maitre's; `ticket` ends here. A broken stream is a 502.
pub(super) fn respond(
    parts: Parts,
    folded: Folded,
    api: Api,
    grant: &Grant,
    ticket: Ticket,
) -> Result<Response<ProxyBody>, Refusal> {
    let (status, body, outcome) = match folded {
        Folded::Answer(b) => (StatusCode::OK, b, Outcome::Ok),
        Folded::Error(status, b) => (status, b, Outcome::UpstreamError),
        Folded::Cut(what) => return Err(broke_off(ticket, what.to_string())),
    };
    let mut p = parts;
    p.status = status;
    p.headers = strip_hop_by_hop(&p.headers);
    p.headers.remove(header::CONTENT_LENGTH);
    p.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(api.content_type()),
    );
    super::scheduled::maitre_headers(&mut p.headers, grant);
    grant.run.mark_client_first_byte();
    ticket.finish(outcome);
    let body = Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed();
    Ok(Response::from_parts(p, body))
}

/// Ends a request whose upstream stream broke off, logged.
pub(super) fn broke_off(ticket: Ticket, detail: String) -> Refusal {
    tracing::warn!(error = %Escaped(&detail), "upstream answer broke off before its end");
    ticket.finish(Outcome::UpstreamError);
    Refusal::UpstreamBrokeOff { detail }
}
