//! Request bodies at the listener: the size a request may declare (the
//! listener's limit, 1 KiB for GET and HEAD), the [`CappedBody`] the router
//! reads (failing past the limit when no length was declared, recording
//! whether the body has all arrived, for the body deadline), and the drain
//! of a body left unread when the answer goes out ([`discard_later`]). It
//! never keeps a byte the router did not ask for.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Bytes;
use http::{HeaderMap, Method, header};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::time::Instant;

/// The largest body a GET or HEAD may carry: they take none.
const NO_BODY_MAX_BYTES: u64 = 1024;

/// Failures of a request body as the router sees them.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("reading the request body: {0}")]
    Body(#[from] hyper::Error),
}

/// The largest body a request with `method` may have.
pub fn body_cap(method: &Method, max_body_bytes: u64) -> u64 {
    if method == Method::GET || method == Method::HEAD {
        NO_BODY_MAX_BYTES.min(max_body_bytes)
    } else {
        max_body_bytes
    }
}

/// The `Content-Length` the request declares, when it declares one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads and drops what is left of `body` in the background until `until`
/// (`None`: drop it now, which makes hyper close the read side).
pub fn discard_later(mut body: Incoming, until: Option<Instant>) {
    let Some(until) = until else { return };
    if body.is_end_stream() || Instant::now() >= until {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let drain = async { while let Some(Ok(_)) = body.frame().await {} };
        let _ = tokio::time::timeout_at(until, drain).await;
    });
}

/// The request body as the router reads it: fails once more than `cap`
/// bytes arrived (a chunked body declares no length), records whether the
/// last frame arrived (for the body deadline), and when the handler answers
/// without reading it all, hands the rest to [`discard_later`].
pub struct CappedBody {
    /// `None` only while being dropped.
    pub(super) inner: Option<Incoming>,
    pub(super) cap: u64,
    pub(super) received: u64,
    pub(super) finished: Arc<AtomicBool>,
    /// Until when an unread rest is drained; `None` after an error.
    pub(super) linger_until: Option<Instant>,
}

impl Drop for CappedBody {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take()
            && !self.finished.load(Ordering::Acquire)
        {
            discard_later(inner, self.linger_until);
        }
    }
}

impl HttpBody for CappedBody {
    type Data = Bytes;
    type Error = ListenerError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ListenerError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                    if this.received > this.cap {
                        this.linger_until = None;
                        return Poll::Ready(Some(Err(ListenerError::BodyTooLarge {
                            limit: this.cap,
                        })));
                    }
                }
                if inner.is_end_stream() {
                    this.finished.store(true, Ordering::Release);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.linger_until = None;
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(None) => {
                this.finished.store(true, Ordering::Release);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn bodyless_methods_get_a_tiny_cap_and_lengths_parse_strictly() {
        assert_eq!(body_cap(&Method::GET, 1 << 20), NO_BODY_MAX_BYTES);
        assert_eq!(body_cap(&Method::HEAD, 10), 10);
        assert_eq!(body_cap(&Method::PUT, 1 << 20), 1 << 20);
        let mut headers = HeaderMap::new();
        assert_eq!(declared_length(&headers), None);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
        assert_eq!(declared_length(&headers), Some(42));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("-1"));
        assert_eq!(declared_length(&headers), None);
    }
}
