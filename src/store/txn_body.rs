//! How an in-flight transaction's body is kept: either its exact bytes, or
//! an envelope with the EDU list left out and the offset where it goes, the
//! EDUs being the outbox rows the record names (`Store::advance` records
//! that form, so no queued byte is written a second time). Both give the
//! same body for the same record; this module only puts bodies together
//! and knows nothing of the store.

/// The body of a recorded transaction, as `Store::advance` hands it over:
/// put together (`into_body`) by the caller, off the store's writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedBody {
    /// The exact bytes, as recorded.
    Exact(String),
    /// `envelope[..edus_at]`, then the EDUs joined by `,`, then the rest.
    Spliced {
        envelope: String,
        edus_at: usize,
        edus: Vec<String>,
    },
}

impl RecordedBody {
    /// The request body.
    pub fn into_body(self) -> String {
        match self {
            RecordedBody::Exact(body) => body,
            RecordedBody::Spliced {
                envelope,
                edus_at,
                edus,
            } => splice(&envelope, edus_at, edus.iter().map(String::as_str)),
        }
    }
}

/// `envelope` with `edus` (joined by `,`) inserted at byte `edus_at`; an
/// offset past the end or off a character boundary (only a corrupt record
/// has one) puts them at the end.
pub fn splice<'a, I>(envelope: &str, edus_at: usize, edus: I) -> String
where
    I: Iterator<Item = &'a str> + Clone,
{
    let at = if envelope.is_char_boundary(edus_at) {
        edus_at
    } else {
        envelope.len()
    };
    let (head, tail) = envelope.split_at(at);
    let len = head.len() + tail.len() + edus.clone().map(|e| e.len() + 1).sum::<usize>();
    let mut body = String::with_capacity(len);
    body.push_str(head);
    for (i, edu) in edus.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(edu);
    }
    body.push_str(tail);
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_puts_the_edus_at_the_offset() {
        let envelope = "{\"edus\":[],\"origin\":\"a\"}";
        let at = "{\"edus\":[".len();
        assert_eq!(
            splice(envelope, at, ["{}", "{\"x\":1}"].into_iter()),
            "{\"edus\":[{},{\"x\":1}],\"origin\":\"a\"}"
        );
        assert_eq!(splice(envelope, at, std::iter::empty()), envelope);
        assert_eq!(splice("ab", 99, ["x"].into_iter()), "abx");
        let spliced = RecordedBody::Spliced {
            envelope: envelope.to_owned(),
            edus_at: at,
            edus: vec!["{}".to_owned()],
        };
        assert_eq!(spliced.into_body(), "{\"edus\":[{}],\"origin\":\"a\"}");
        assert_eq!(RecordedBody::Exact("b".to_owned()).into_body(), "b");
    }
}
