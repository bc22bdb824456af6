//! The Tribes "data package": `FLT2002` + i32 length + body + `TLF2003` (§1).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{read_i32, WireError};

/// Start marker `FLT2002`.
pub const START_MARKER: &[u8; 7] = b"FLT2002";
/// End marker `TLF2003`.
pub const END_MARKER: &[u8; 7] = b"TLF2003";
/// Bytes a frame adds around its body.
pub const FRAME_OVERHEAD: usize = 18;
/// Default maximum body size: 64 MiB.
///
/// Tribes has no limit at all (a corrupted length means unbounded memory); 64 MiB holds any
/// realistic session-state batch while keeping one bad peer from exhausting memory.
pub const DEFAULT_MAX_BODY_SIZE: usize = 64 * 1024 * 1024;

const HEADER: usize = 11;

/// Frames `body` into a new buffer.
///
/// ```
/// let frame = tribes::wire::encode_frame(b"abc");
/// assert_eq!(&frame[..], b"FLT2002\0\0\0\x03abcTLF2003");
/// ```
pub fn encode_frame(body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(body.len() + FRAME_OVERHEAD);
    encode_frame_into(&mut buf, body);
    buf.freeze()
}

/// Appends a frame around `body` to `buf`.
pub fn encode_frame_into(buf: &mut BytesMut, body: &[u8]) {
    buf.reserve(body.len() + FRAME_OVERHEAD);
    buf.put_slice(START_MARKER);
    buf.put_i32(body.len() as i32);
    buf.put_slice(body);
    buf.put_slice(END_MARKER);
}

/// Incremental frame decoder: push bytes in any split, take complete frame bodies out.
///
/// It never reserves memory for an announced length: a header is checked (sign, maximum) as
/// soon as its 11 bytes are present, and the buffer only grows by what is pushed. A start
/// marker is checked byte by byte, so junk is refused after the first wrong byte. Errors are
/// sticky: once a stream is bad the connection should be closed; there is no resync.
///
/// ```
/// use tribes::wire::{encode_frame, FrameDecoder};
/// let mut d = FrameDecoder::new(1024);
/// let f = encode_frame(b"hello");
/// d.push(&f[..4]);
/// assert_eq!(d.next_frame().unwrap(), None);
/// d.push(&f[4..]);
/// assert_eq!(&d.next_frame().unwrap().unwrap()[..], b"hello");
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_body: usize,
    error: Option<WireError>,
}

impl FrameDecoder {
    /// Size of the buffer chunks frames are read into: 1 MiB.
    pub const CHUNK: usize = 1024 * 1024;

    /// A decoder refusing bodies over `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_body,
            error: None,
        }
    }

    /// Appends received bytes.
    ///
    /// When the buffer is full it moves to a fresh chunk of [`FrameDecoder::CHUNK`] bytes;
    /// a frame in progress that needs more grows by doubling what has arrived of it, up to
    /// exactly its size, so a peer announcing a large frame gets at most about twice what it
    /// actually sent, never the announced length up front (and never more than
    /// `max_body + 18` plus this push). Frames are split off the chunk without copying, so
    /// one allocation serves many small frames.
    pub fn push(&mut self, data: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let needed = self.buf.len() + data.len();
        if needed > self.buf.capacity() {
            let frame_total = match self.check_header() {
                Ok(Some(len)) => HEADER + len + END_MARKER.len(),
                _ => 0,
            };
            let chunk = Self::CHUNK.min(self.max_body + FRAME_OVERHEAD + data.len());
            let doubled = frame_total.min(self.buf.len().saturating_mul(2));
            let mut grown = BytesMut::with_capacity(needed.max(doubled).max(chunk));
            grown.extend_from_slice(&self.buf);
            self.buf = grown;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes currently allocated for the buffer.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The configured maximum body size.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// True when a partial frame is buffered.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next complete frame body, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, WireError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.check_header() {
            Ok(Some(len)) => {
                let total = HEADER + len + END_MARKER.len();
                if self.buf.len() < total {
                    return Ok(None);
                }
                if &self.buf[HEADER + len..total] != END_MARKER {
                    return Err(self.fail(WireError::BadEndMarker));
                }
                let mut frame = self.buf.split_to(total);
                frame.advance(HEADER);
                frame.truncate(len);
                Ok(Some(frame.freeze()))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Validates whatever part of the header is buffered; returns the body length once the
    /// whole header is present.
    fn check_header(&self) -> Result<Option<usize>, WireError> {
        let have = self.buf.len().min(START_MARKER.len());
        if self.buf[..have] != START_MARKER[..have] {
            return Err(WireError::BadStartMarker);
        }
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let n = read_i32(&self.buf, 7);
        if n < 0 {
            return Err(WireError::NegativeLength(n));
        }
        let len = n as usize;
        if len > self.max_body {
            return Err(WireError::TooLarge {
                len,
                max: self.max_body,
            });
        }
        Ok(Some(len))
    }

    fn fail(&mut self, e: WireError) -> WireError {
        self.error = Some(e.clone());
        // Release the buffer: nothing in it can be used any more.
        self.buf = BytesMut::new();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_frames_in_one_push() {
        let mut all = BytesMut::new();
        for body in [&b"a"[..], b"", b"xyz"] {
            encode_frame_into(&mut all, body);
        }
        let mut d = FrameDecoder::new(16);
        d.push(&all);
        assert_eq!(&d.next_frame().unwrap().unwrap()[..], b"a");
        assert_eq!(&d.next_frame().unwrap().unwrap()[..], b"");
        assert_eq!(&d.next_frame().unwrap().unwrap()[..], b"xyz");
        assert_eq!(d.next_frame().unwrap(), None);
        assert!(!d.has_partial());
    }

    #[test]
    fn bad_start_is_refused_on_first_byte() {
        let mut d = FrameDecoder::new(16);
        d.push(b"G");
        assert_eq!(d.next_frame(), Err(WireError::BadStartMarker));
        // Sticky.
        d.push(b"FLT2002");
        assert_eq!(d.next_frame(), Err(WireError::BadStartMarker));
    }

    #[test]
    fn negative_and_oversize_lengths_are_refused_from_the_header() {
        let mut d = FrameDecoder::new(16);
        d.push(b"FLT2002\xff\xff\xff\xf0");
        assert_eq!(d.next_frame(), Err(WireError::NegativeLength(-16)));
        let mut d = FrameDecoder::new(16);
        d.push(b"FLT2002\x7f\xff\xff\xff");
        assert_eq!(
            d.next_frame(),
            Err(WireError::TooLarge {
                len: i32::MAX as usize,
                max: 16
            })
        );
        assert!(d.capacity() < 64);
    }

    #[test]
    fn a_large_announced_frame_gets_memory_as_it_arrives_not_up_front() {
        let announced = 60 * 1024 * 1024;
        let mut d = FrameDecoder::new(64 * 1024 * 1024);
        d.push(b"FLT2002");
        d.push(&(announced as i32).to_be_bytes());
        let piece = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while sent < 3 * FrameDecoder::CHUNK {
            d.push(&piece);
            sent += piece.len();
            assert_eq!(d.next_frame(), Ok(None));
            // About twice what arrived (or one chunk), never the 60 MiB announced.
            let bound = (2 * (sent + 11) + piece.len()).max(FrameDecoder::CHUNK);
            assert!(d.capacity() <= bound, "{} after {sent}", d.capacity());
        }
        // The rest arrives: the frame comes out whole.
        let rest = vec![7u8; announced - sent];
        d.push(&rest);
        d.push(END_MARKER);
        assert_eq!(d.next_frame().unwrap().unwrap().len(), announced);
    }

    #[test]
    fn bad_end_marker() {
        let mut d = FrameDecoder::new(16);
        d.push(b"FLT2002\0\0\0\x01xTLF2004");
        assert_eq!(d.next_frame(), Err(WireError::BadEndMarker));
    }
}
