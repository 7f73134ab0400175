//! An answer's head on a plain connection, held until it is whole, so that
//! awc reads the answer as RFC 9112 frames it.
//!
//! - awc 3 reads an HTTP/1.1 answer with neither `Content-Length` nor a
//!   `Transfer-Encoding` ending in `chunked` as having no body (and pools
//!   its connection with the body still in it), where RFC 9112 §6.3 says
//!   the body runs to the connection's end. It does read such bodies to
//!   the end for HTTP/1.0 answers, so such a head is handed on as
//!   HTTP/1.0: one byte of the status line, which the gateway does not
//!   keep (it stores the status code and the headers).
//! - awc takes an interim 1xx head (`102 Processing`, `103 Early Hints`)
//!   for the answer. Interim heads are dropped here: awc sees the final
//!   one.
//!
//! Heads are parsed by httparse with awc's own settings, so what is held
//! is what awc would read. A TLS connection is not scanned (its bytes are
//! ciphertext here); `upstream` refuses an interim head that reaches it.

use httparse::{ParserConfig, Status};

/// The longest head held; a longer one passes as it came (awc refuses it).
const MAX_HEAD: usize = 64 * 1024;
/// As many header fields as awc parses.
const MAX_HEADERS: usize = 96;

#[derive(Debug)]
pub(super) struct HeadScan {
    held: Vec<u8>,
    /// The request was HEAD: its answer has no body whatever it says.
    head_request: bool,
}

/// What the bytes held so far are.
enum Parsed {
    Partial,
    /// Not a head awc can read: passed on as it came, for awc to refuse.
    Bad,
    Head {
        len: usize,
        code: u16,
        /// Where the status line's version digit is, to be made `0`.
        to_1_0: Option<usize>,
    },
}

impl HeadScan {
    pub(super) fn new(head_request: bool) -> HeadScan {
        HeadScan {
            held: Vec::new(),
            head_request,
        }
    }

    /// Takes bytes as read. `Some`: everything held, the final head
    /// whole (and rewritten where it must be), to hand on; the scan is
    /// over. `None`: more is needed.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        self.held.extend_from_slice(bytes);
        loop {
            match self.parse() {
                Parsed::Partial if self.held.len() <= MAX_HEAD => return None,
                Parsed::Partial | Parsed::Bad => return Some(std::mem::take(&mut self.held)),
                Parsed::Head { len, code, .. } if (100..200).contains(&code) && code != 101 => {
                    self.held.drain(..len);
                }
                Parsed::Head { to_1_0, .. } => {
                    if let Some(at) = to_1_0 {
                        self.held[at] = b'0';
                    }
                    return Some(std::mem::take(&mut self.held));
                }
            }
        }
    }

    /// The connection ended before a whole head: what came, as it came.
    pub(super) fn end(self) -> Vec<u8> {
        self.held
    }

    fn parse(&self) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        let mut config = ParserConfig::default();
        config.allow_spaces_after_header_name_in_responses(true);
        let len = match config.parse_response(&mut res, &self.held) {
            Ok(Status::Complete(len)) => len,
            Ok(Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Bad,
        };
        let Some(code) = res.code else {
            return Parsed::Bad;
        };
        let framed = res.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("content-length")
                || h.name.eq_ignore_ascii_case("transfer-encoding")
                    && h.value
                        .rsplit(|&b| b == b',')
                        .next()
                        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        });
        let bodiless = code < 200 || code == 204 || code == 304;
        let to_1_0 = (res.version == Some(1) && !framed && !bodiless && !self.head_request)
            .then(|| {
                // httparse skips empty lines before the status line.
                let start = self.held.iter().position(|&b| b != b'\r' && b != b'\n');
                start.map(|s| s + "HTTP/1.".len())
            })
            .flatten();
        Parsed::Head { len, code, to_1_0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(head_request: bool, parts: &[&[u8]]) -> Option<Vec<u8>> {
        let mut s = HeadScan::new(head_request);
        parts.iter().find_map(|p| s.feed(p))
    }

    #[test]
    fn a_body_that_ends_with_the_connection_is_handed_on_as_http_1_0() {
        let got = scan(false, &[b"HTTP/1.1 200 OK\r\nX-A: b\r", b"\n\r\nbody-"]);
        assert_eq!(got.unwrap(), b"HTTP/1.0 200 OK\r\nX-A: b\r\n\r\nbody-");
        // Bare line feeds, as awc reads them too; a coding other than
        // chunked last does not frame a body.
        let got = scan(false, &[b"HTTP/1.1 200 OK\nTransfer-Encoding: gzip\n\nz"]);
        assert_eq!(
            got.unwrap(),
            b"HTTP/1.0 200 OK\nTransfer-Encoding: gzip\n\nz"
        );
    }

    #[test]
    fn framed_bodiless_and_other_heads_pass_unchanged() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding : gzip, chunked\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert_eq!(scan(false, &[head]).unwrap(), head);
        }
        let head = b"HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(scan(true, &[head]).unwrap(), head, "the answer to a HEAD");
    }

    #[test]
    fn interim_heads_are_dropped_and_the_final_one_is_scanned() {
        let mut s = HeadScan::new(false);
        assert_eq!(
            s.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Ea"),
            None
        );
        assert_eq!(s.feed(b"rly Hints\r\nLink: x\r\n\r\nHTTP/1.1 2"), None);
        assert_eq!(
            s.feed(b"00 OK\r\n\r\nx").unwrap(),
            b"HTTP/1.0 200 OK\r\n\r\nx"
        );
        let framed =
            b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(scan(false, &[framed]).unwrap(), &framed[27..]);
    }

    #[test]
    fn a_head_that_never_ends_is_let_go() {
        let mut s = HeadScan::new(false);
        assert_eq!(s.feed(b"HTTP/1.1 200 OK\r\n"), None);
        let long = vec![b'a'; MAX_HEAD];
        assert_eq!(s.feed(&long).map(|b| b.len()), Some(MAX_HEAD + 17));
        let mut s = HeadScan::new(false);
        assert_eq!(s.feed(b"HTTP/1.1 200"), None);
        assert_eq!(s.end(), b"HTTP/1.1 200");
    }
}
