//! An answer's head on a plain connection, held until it is whole, so that
//! a body framed by the connection's end reaches awc whole.
//!
//! awc 3 reads an HTTP/1.1 answer with neither `Content-Length` nor
//! chunking as having no body (and pools its connection with the body still
//! in it), where RFC 9112 §6.3 says the body runs to the connection's end.
//! It does read such bodies to the end for HTTP/1.0 answers. So such a
//! head is handed on as HTTP/1.0: one byte of the status line, which the
//! gateway does not keep (it stores the status code and the headers).
//! Heads of 1xx answers pass unchanged and the next head is scanned; a
//! TLS connection is not scanned (its bytes are ciphertext here).

/// The longest head held; a longer one passes as it came (awc refuses it).
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
pub(super) struct HeadScan {
    held: Vec<u8>,
    /// Where the next head starts in `held` (after interim 1xx heads).
    from: usize,
    /// The request was HEAD: its answer has no body whatever it says.
    head_request: bool,
}

impl HeadScan {
    pub(super) fn new(head_request: bool) -> HeadScan {
        HeadScan {
            held: Vec::new(),
            from: 0,
            head_request,
        }
    }

    /// Takes bytes as read. `Some`: everything held, the final head
    /// whole (and rewritten where it must be), to hand on; the scan is
    /// over. `None`: more is needed.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        self.held.extend_from_slice(bytes);
        loop {
            let rest = &self.held[self.from..];
            let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
                return (self.held.len() > MAX_HEAD).then(|| std::mem::take(&mut self.held));
            };
            let head = &rest[..end + 4];
            let code = status_code(head);
            if code.is_some_and(|c| (100..200).contains(&c) && c != 101) {
                self.from += end + 4;
                continue;
            }
            if code.is_some_and(|c| self.ends_with_connection(head, c)) {
                // "HTTP/1.1" → "HTTP/1.0"
                self.held[self.from + 7] = b'0';
            }
            return Some(std::mem::take(&mut self.held));
        }
    }

    /// The connection ended before a whole head: what came, as it came.
    pub(super) fn end(self) -> Vec<u8> {
        self.held
    }

    /// Whether this final head's body runs to the connection's end.
    fn ends_with_connection(&self, head: &[u8], code: u16) -> bool {
        let bodiless = code < 200 || code == 204 || code == 304;
        if !head.starts_with(b"HTTP/1.1 ") || self.head_request || bodiless {
            return false;
        }
        let framed = head.split(|&b| b == b'\n').skip(1).any(|line| {
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            let name = name.trim_ascii();
            name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"transfer-encoding")
        });
        !framed
    }
}

/// The status code of a head's status line (`HTTP/1.x NNN ...`).
fn status_code(head: &[u8]) -> Option<u16> {
    let code = head.get(9..12)?;
    if !head.starts_with(b"HTTP/1.") || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
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
    }

    #[test]
    fn framed_bodiless_and_other_heads_pass_unchanged() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding : chunked\r\n\r\n",
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
    fn interim_heads_pass_and_the_final_one_is_scanned() {
        let mut s = HeadScan::new(false);
        assert_eq!(s.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"), None);
        assert_eq!(
            s.feed(b"00 OK\r\n\r\nx").unwrap(),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nx"
        );
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
