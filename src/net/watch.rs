//! What an attempt did on the wire: every upstream connection is
//! `Watched` and reports to the `AttemptWatch` of the task polling it (see
//! the module above for what it notes and why), and holds each answer's
//! head until whole (`head`).

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_rt::net::{ActixStream, Ready, TcpStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::head::HeadScan;

thread_local! {
    /// The watch of the task polling a connection right now (see
    /// `AttemptWatch::poll`). awc's client is `!Send`: a connection is
    /// only ever polled on the thread that made it.
    static CURRENT: Cell<Option<Rc<Seen>>> = const { Cell::new(None) };
}

struct Seen {
    /// Tells this attempt from the one before on a pooled connection.
    attempt: u64,
    /// Request bytes may have been written.
    wrote: Cell<bool>,
    /// The body is being read: from now on end of file means a cut.
    reading_body: Cell<bool>,
    /// A read found end of file while the body was read.
    eof: Cell<bool>,
}

/// What one attempt's connection did, as seen from the task driving it.
#[derive(Clone, Default)]
pub struct AttemptWatch(Rc<Seen>);

impl AttemptWatch {
    /// Runs `poll` with this watch current, so connection reads and writes
    /// inside it are noted here.
    pub fn poll<T>(&self, poll: impl FnOnce() -> T) -> T {
        let outer = CURRENT.with(|c| c.replace(Some(self.0.clone())));
        let out = poll();
        CURRENT.with(|c| c.set(outer));
        out
    }

    /// The answer's body is read from now on.
    pub fn reading_body(&self) {
        self.0.reading_body.set(true);
    }

    pub fn wrote_request(&self) -> bool {
        self.0.wrote.get()
    }

    pub fn saw_eof(&self) -> bool {
        self.0.eof.get()
    }
}

fn with_current(f: impl FnOnce(&Seen)) {
    CURRENT.with(|c| {
        if let Some(seen) = c.take() {
            f(&seen);
            c.set(Some(seen));
        }
    });
}

impl Default for Seen {
    fn default() -> Seen {
        thread_local! {
            static ATTEMPTS: Cell<u64> = const { Cell::new(0) };
        }
        Seen {
            attempt: ATTEMPTS.with(|n| {
                n.set(n.get() + 1);
                n.get()
            }),
            wrote: Cell::default(),
            reading_body: Cell::default(),
            eof: Cell::default(),
        }
    }
}

/// A TCP stream that reports to the current `AttemptWatch`.
#[derive(Debug)]
pub struct Watched {
    io: TcpStream,
    /// TLS runs over it: its first write is the ClientHello.
    tls: bool,
    /// Writes that moved bytes so far.
    writes: u64,
    /// The attempt whose request was written last.
    attempt: u64,
    /// Its answer's head, until whole (plain connections only).
    scan: Option<HeadScan>,
    /// Read bytes not yet handed to awc, from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
}

impl Watched {
    pub(super) fn new(io: TcpStream, tls: bool) -> Watched {
        Watched {
            io,
            tls,
            writes: 0,
            attempt: 0,
            scan: None,
            out: Vec::new(),
            out_at: 0,
        }
    }

    fn wrote(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.writes += 1;
        if !self.tls || self.writes > 1 {
            with_current(|seen| seen.wrote.set(true));
        }
    }

    /// A write of a new attempt's request starts the scan of its answer.
    fn writing(&mut self, first: &[u8]) {
        if self.tls {
            return;
        }
        let mut attempt = self.attempt;
        with_current(|seen| attempt = seen.attempt);
        if attempt != self.attempt {
            self.attempt = attempt;
            self.scan = Some(HeadScan::new(first.starts_with(b"HEAD ")));
        }
    }

    /// Hands on held bytes, if any.
    fn hand_on(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.out_at >= self.out.len() {
            return false;
        }
        let n = buf.remaining().min(self.out.len() - self.out_at);
        buf.put_slice(&self.out[self.out_at..self.out_at + n]);
        self.out_at += n;
        if self.out_at == self.out.len() {
            self.out = Vec::new();
            self.out_at = 0;
        }
        true
    }

    /// Reads while an answer's head is held; `None` once it is handed on
    /// (or was never held), to read as usual.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        while let Some(scan) = self.scan.as_mut() {
            let mut bytes = [0u8; 4096];
            let mut read = ReadBuf::new(&mut bytes);
            match Pin::new(&mut self.io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    self.out = self.scan.take().map(HeadScan::end).unwrap_or_default();
                }
                Poll::Ready(Ok(())) => {
                    if let Some(whole) = scan.feed(read.filled()) {
                        self.out = whole;
                        self.scan = None;
                    }
                }
                other => return Some(other),
            }
        }
        None
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.hand_on(buf) {
            return Poll::Ready(Ok(()));
        }
        if let Some(pending) = self.poll_head(cx) {
            return pending;
        }
        if self.hand_on(buf) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(())))
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            with_current(|seen| {
                if seen.reading_body.get() {
                    seen.eof.set(true);
                }
            });
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writing(buf);
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.wrote(n);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writing(bufs.iter().find(|b| !b.is_empty()).map_or(&[], |b| &b[..]));
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.wrote(n);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl ActixStream for Watched {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        if self.out_at < self.out.len() {
            return Poll::Ready(Ok(Ready::READABLE));
        }
        <TcpStream as ActixStream>::poll_read_ready(&self.io, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        <TcpStream as ActixStream>::poll_write_ready(&self.io, cx)
    }
}
