//! What hyper's HTTP/2 server does not tell the gateway: the streams that the h2 library
//! refuses or resets before they become requests (a header list over its limit, a stream
//! without `:path` or with a forbidden header, one over the concurrent-stream limit, one the
//! client reset before it was accepted), and the error a connection ended with.
//!
//! [`H2Watch`] sits between hyper and the connection's plaintext (under TLS: above rustls)
//! and reads the frame headers going by, without changing a byte: client streams opened
//! (a `HEADERS` frame on a new stream id), and the `RST_STREAM` and `GOAWAY` frames the
//! gateway sends with their error codes. When the connection ends, the streams opened but
//! never handed to the gateway's service (counted as hyper calls it) are recorded in one
//! audit event (`pipeline::record_h2_refused`). HTTP/2 connections are wrapped, and so are
//! plain connections on an h2c listener until their first bytes show HTTP/1.1 (reading stops
//! there); HTTP/1.1 over TLS and on a listener without h2c is not wrapped.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client's connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;

/// RFC 9113's error codes, by number.
const CODES: [&str; 14] = [
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
];

fn code_name(code: u32) -> String {
    CODES
        .get(code as usize)
        .map_or_else(|| format!("error code {code}"), |n| (*n).to_string())
}

/// What the frames of one connection showed; read when it ends.
#[derive(Default)]
pub(crate) struct H2Counts {
    /// Client streams opened.
    opened: AtomicU32,
    /// Streams handed to the gateway's service.
    accepted: AtomicU32,
    /// `RST_STREAM` frames the gateway sent, by error code (the last slot: codes past
    /// `HTTP_1_1_REQUIRED`).
    resets: [AtomicU32; CODES.len() + 1],
    /// The error code of the last `GOAWAY` the gateway sent, plus one (0: none sent).
    goaway: AtomicU32,
    /// The client did not begin with the HTTP/2 preface on a connection that ALPN made
    /// HTTP/2.
    no_preface: AtomicBool,
}

impl H2Counts {
    /// A stream was handed to the gateway's service.
    pub(crate) fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    /// What the audit event says, when there is something to say.
    pub(crate) fn summary(&self) -> Option<String> {
        if self.no_preface.load(Relaxed) {
            return Some(
                "HTTP/2 (negotiated with ALPN): the client did not send the HTTP/2 connection preface"
                    .into(),
            );
        }
        let refused = self
            .opened
            .load(Relaxed)
            .saturating_sub(self.accepted.load(Relaxed));
        let goaway = self.goaway.load(Relaxed).checked_sub(1).filter(|c| *c != 0);
        if refused == 0 && goaway.is_none() {
            return None;
        }
        let mut text = format!(
            "HTTP/2: {refused} stream{} never reached a route (refused or reset by the HTTP/2 layer, or reset by the client before it was accepted)",
            if refused == 1 { "" } else { "s" }
        );
        let resets: Vec<String> = self
            .resets
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(code, n)| {
                let n = n.load(Relaxed);
                let name = match code {
                    c if c < CODES.len() => code_name(c as u32),
                    _ => "other codes".into(),
                };
                (n > 0).then(|| format!("{name} x{n}"))
            })
            .collect();
        if !resets.is_empty() {
            text.push_str("; streams reset by the gateway: ");
            text.push_str(&resets.join(", "));
        }
        if let Some(code) = goaway {
            text.push_str("; the connection was closed with GOAWAY ");
            text.push_str(&code_name(code));
        }
        Some(text)
    }

    fn outbound(&self, kind: u8, payload: &[u8]) {
        match kind {
            RST_STREAM if payload.len() >= 4 => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let slot = (code as usize).min(CODES.len());
                self.resets[slot].fetch_add(1, Relaxed);
            }
            GOAWAY if payload.len() >= 8 => {
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                self.goaway.store(code.saturating_add(1), Relaxed);
            }
            _ => {}
        }
    }
}

/// Where a reader of frames is: in the preface, in a frame's 9-byte header, or in its
/// payload (of which the first 8 bytes are kept: enough for `RST_STREAM` and `GOAWAY`).
#[derive(Clone, Copy)]
enum State {
    Preface(usize),
    Head,
    Payload {
        left: u32,
        kind: u8,
        want: usize,
    },
    /// Not HTTP/2 (or not yet known to be): bytes pass unread.
    Off,
}

struct Frames {
    state: State,
    head: [u8; 9],
    have: usize,
    first: [u8; 8],
    got: usize,
}

impl Frames {
    fn new(state: State) -> Frames {
        Frames {
            state,
            head: [0; 9],
            have: 0,
            first: [0; 8],
            got: 0,
        }
    }

    /// Reads `bytes`, calling `frame(kind, stream id, payload start)` once per frame: after
    /// its header for a frame without payload, else once its first bytes (at most 8) are in.
    /// `preface(matched)` is called when the preface has been read whole or found missing.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut frame: impl FnMut(u8, u32, &[u8]),
        mut preface: impl FnMut(bool),
    ) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Preface(at) => {
                    let n = bytes.len().min(PREFACE.len() - at);
                    if bytes[..n] != PREFACE[at..at + n] {
                        self.state = State::Off;
                        preface(false);
                        return;
                    }
                    bytes = &bytes[n..];
                    self.state = if at + n == PREFACE.len() {
                        preface(true);
                        State::Head
                    } else {
                        State::Preface(at + n)
                    };
                }
                State::Head => {
                    let n = bytes.len().min(9 - self.have);
                    self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                    self.have += n;
                    bytes = &bytes[n..];
                    if self.have < 9 {
                        return;
                    }
                    self.have = 0;
                    self.got = 0;
                    let h = self.head;
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    if len == 0 {
                        frame(h[3], stream_of(&h), &[]);
                    } else {
                        self.state = State::Payload {
                            left: len,
                            kind: h[3],
                            want: (len as usize).min(8),
                        };
                    }
                }
                State::Payload { left, kind, want } => {
                    let n = bytes.len().min(left as usize);
                    if self.got < want {
                        // The payload's first bytes, up to `want`.
                        let keep = n.min(want - self.got);
                        self.first[self.got..self.got + keep].copy_from_slice(&bytes[..keep]);
                        self.got += keep;
                        if self.got == want {
                            frame(kind, stream_of(&self.head), &self.first[..want]);
                        }
                    }
                    bytes = &bytes[n..];
                    let left = left - n as u32;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Payload { left, kind, want }
                    };
                }
            }
        }
    }
}

fn stream_of(h: &[u8; 9]) -> u32 {
    u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff
}

/// A connection's I/O, read by [`Frames`] both ways on its way through.
pub(crate) struct H2Watch<I> {
    io: I,
    inbound: Frames,
    outbound: Frames,
    /// The highest client stream id seen opened.
    last_stream: u32,
    /// ALPN said HTTP/2 (else: h2c detection, where a missing preface means HTTP/1.1).
    alpn: bool,
    counts: Arc<H2Counts>,
}

impl<I> H2Watch<I> {
    /// `alpn`: the connection is HTTP/2 by ALPN (the server's frames are read from the
    /// start); else it may be h2c or HTTP/1.1, told by the client's first bytes.
    pub(crate) fn new(io: I, alpn: bool, counts: Arc<H2Counts>) -> Self {
        H2Watch {
            io,
            inbound: Frames::new(State::Preface(0)),
            outbound: Frames::new(if alpn { State::Head } else { State::Off }),
            last_stream: 0,
            alpn,
            counts,
        }
    }

    fn read(&mut self, bytes: &[u8]) {
        let counts = &self.counts;
        let last = &mut self.last_stream;
        let outbound = &mut self.outbound;
        let alpn = self.alpn;
        self.inbound.feed(
            bytes,
            |kind, stream, _| {
                // Client streams have odd ids, each higher than the last; trailers and
                // CONTINUATION frames open none.
                if kind == HEADERS && stream % 2 == 1 && stream > *last {
                    *last = stream;
                    counts.opened.fetch_add(1, Relaxed);
                }
            },
            |matched| match (matched, alpn) {
                (true, false) => outbound.state = State::Head,
                (false, true) => {
                    counts.no_preface.store(true, Relaxed);
                    outbound.state = State::Off;
                }
                _ => {}
            },
        );
    }

    fn wrote(&mut self, bytes: &[u8]) {
        let counts = &self.counts;
        self.outbound.feed(
            bytes,
            |kind, _, payload| counts.outbound(kind, payload),
            |_| {},
        );
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for H2Watch<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if !matches!(this.inbound.state, State::Off) {
                let filled = &buf.filled()[before..];
                this.read(filled);
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for H2Watch<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(&buf[..n]);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            let mut left = n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                this.wrote(&b[..take]);
                left -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn code(c: u32) -> Vec<u8> {
        c.to_be_bytes().to_vec()
    }

    /// Fed in pieces of every size (as reads and writes split them), the counts are the same.
    fn watched(
        alpn: bool,
        client: &[u8],
        server: &[u8],
        step: usize,
        accepted: u32,
    ) -> Arc<H2Counts> {
        let counts = Arc::new(H2Counts::default());
        for _ in 0..accepted {
            counts.accepted();
        }
        let mut w = H2Watch::new((), alpn, counts.clone());
        for piece in client.chunks(step) {
            w.read(piece);
        }
        for piece in server.chunks(step) {
            w.wrote(piece);
        }
        counts
    }

    fn client_frames() -> Vec<u8> {
        let mut c = PREFACE.to_vec();
        c.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        c.extend(frame(HEADERS, 0x5, 1, &[0x82, 0x86, 0x84]));
        c.extend(frame(HEADERS, 0x4, 3, &[0x82, 0x86]));
        c.extend(frame(0x0, 0, 3, &[7; 100])); // DATA
        c.extend(frame(HEADERS, 0x1, 3, &[0x40])); // trailers: no new stream
        c.extend(frame(0x9, 0x4, 3, &[1, 2])); // CONTINUATION
        c.extend(frame(HEADERS, 0x5, 5, &[0x82; 20]));
        c.extend(frame(0x3, 0, 7, &code(8))); // a client RST_STREAM: not the gateway's
        c
    }

    fn server_frames() -> Vec<u8> {
        let mut s = frame(0x4, 0, 0, &[0, 3, 0, 0, 1, 0]); // SETTINGS
        s.extend(frame(HEADERS, 0x4, 1, &[0x88]));
        s.extend(frame(0x0, 0x1, 1, &[b'x'; 300]));
        s.extend(frame(RST_STREAM, 0, 3, &code(1)));
        s.extend(frame(RST_STREAM, 0, 5, &code(7)));
        s.extend(frame(RST_STREAM, 0, 9, &code(1)));
        s.extend(frame(RST_STREAM, 0, 11, &code(99)));
        s.extend(frame(
            GOAWAY,
            0,
            0,
            &[0, 0, 0, 5, 0, 0, 0, 11, b'd', b'b', b'g'],
        ));
        s
    }

    #[test]
    fn streams_opened_and_the_gateways_resets_are_counted_however_bytes_are_split() {
        let (client, server) = (client_frames(), server_frames());
        for step in 1..=client.len() {
            let counts = watched(true, &client, &server, step, 1);
            assert_eq!(counts.opened.load(Relaxed), 3, "step {step}");
            let text = counts.summary().expect("streams refused");
            assert_eq!(
                text,
                "HTTP/2: 2 streams never reached a route (refused or reset by the HTTP/2 layer, \
                 or reset by the client before it was accepted); streams reset by the gateway: \
                 PROTOCOL_ERROR x2, REFUSED_STREAM x1, other codes x1; the connection was \
                 closed with GOAWAY ENHANCE_YOUR_CALM",
                "step {step}"
            );
        }
        // Every stream served and a graceful end: nothing to record.
        let mut server = frame(0x4, 0, 0, &[]);
        server.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0]));
        assert!(watched(true, &client, &server, 7, 3).summary().is_none());
        // h2c detection: the same (this server reset nothing).
        let text = watched(false, &client, &server, 5, 1).summary().unwrap();
        assert!(
            text.starts_with("HTTP/2: 2 streams never reached a route") && !text.contains("; "),
            "{text}"
        );
    }

    #[test]
    fn http1_through_h2c_detection_is_left_alone_and_a_missing_preface_is_told() {
        let client = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // Bytes that would read as frames with odd stream ids if they were parsed.
        let server = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        for step in 1..client.len() {
            let counts = watched(false, client, server, step, 1);
            assert_eq!(counts.opened.load(Relaxed), 0);
            assert!(counts.summary().is_none(), "step {step}");
        }
        // ALPN said h2, the client says otherwise.
        let text = watched(true, client, &[], 3, 0).summary().unwrap();
        assert!(
            text.contains("did not send the HTTP/2 connection preface"),
            "{text}"
        );
    }
}
