//! Property tests for the pure wire codecs: round trips, arbitrary stream splits, hostile
//! input (no panics, bounded buffering) and marker corruption.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::Config;
use tribes::wire::{
    decode_member, encode_frame, encode_frame_into, encode_member, member_record_len, AckCommand,
    ChannelMessage, FrameDecoder, WireError, ACK_BODY, END_MARKER, FAIL_ACK_BODY, FRAME_OVERHEAD,
    MEMBER_BEGIN, MEMBER_END, START_MARKER,
};
use tribes::{Member, SendOptions, UniqueId};

/// Small maximum body used by the hostile-input tests.
const MAX_BODY: usize = 4096;

/// Moderate case counts (overridable with `PROPTEST_CASES` for a longer soak), and no
/// regression files written into the source tree.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn host() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
    ]
}

fn blob(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn member() -> impl Strategy<Value = Member> {
    (
        host(),
        any::<u16>(),
        any::<i32>(),
        any::<i32>(),
        any::<i64>(),
        any::<[u8; 16]>(),
        blob(300),
        blob(300),
        blob(300),
    )
        .prop_map(
            |(host, port, secure_port, udp_port, alive_time, id, command, domain, payload)| {
                Member {
                    host,
                    port,
                    secure_port,
                    udp_port,
                    alive_time,
                    unique_id: UniqueId(id),
                    command,
                    domain,
                    payload,
                }
            },
        )
}

fn message_with(payload_max: usize) -> impl Strategy<Value = ChannelMessage> {
    (
        any::<u32>(),
        any::<i64>(),
        any::<[u8; 16]>(),
        member(),
        blob(payload_max),
    )
        .prop_map(|(options, timestamp, id, sender, payload)| ChannelMessage {
            options: SendOptions::from_bits(options),
            timestamp,
            unique_id: UniqueId(id),
            sender,
            payload,
        })
}

fn message() -> impl Strategy<Value = ChannelMessage> {
    message_with(4096)
}

/// Chunk sizes for feeding a stream; cycled until the stream is used up.
fn chunk_sizes(max: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max, 1..24)
}

// ---------------------------------------------------------------------------------------------
// Field-by-field comparison (Member's `==` is identity only)
// ---------------------------------------------------------------------------------------------

fn member_fields_eq(a: &Member, b: &Member) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.host, b.host);
    prop_assert_eq!(a.port, b.port);
    prop_assert_eq!(a.secure_port, b.secure_port);
    prop_assert_eq!(a.udp_port, b.udp_port);
    prop_assert_eq!(a.alive_time, b.alive_time);
    prop_assert_eq!(a.unique_id, b.unique_id);
    prop_assert_eq!(&a.command, &b.command);
    prop_assert_eq!(&a.domain, &b.domain);
    prop_assert_eq!(&a.payload, &b.payload);
    Ok(())
}

fn message_fields_eq(a: &ChannelMessage, b: &ChannelMessage) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.options.bits(), b.options.bits());
    prop_assert_eq!(a.timestamp, b.timestamp);
    prop_assert_eq!(a.unique_id, b.unique_id);
    member_fields_eq(&a.sender, &b.sender)?;
    prop_assert_eq!(&a.payload, &b.payload);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Stream helpers
// ---------------------------------------------------------------------------------------------

/// Takes every complete frame out of `d`; stops at `Ok(None)` or at the first error.
fn drain(d: &mut FrameDecoder, out: &mut Vec<Bytes>) -> Result<(), WireError> {
    while let Some(body) = d.next_frame()? {
        out.push(body);
    }
    Ok(())
}

/// Feeds `stream` in chunks of the given sizes (cycled), draining after each push.
fn feed_chunked(
    d: &mut FrameDecoder,
    stream: &[u8],
    sizes: &[usize],
) -> Result<Vec<Bytes>, WireError> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = sizes[i % sizes.len()].min(stream.len() - at);
        i += 1;
        d.push(&stream[at..at + n]);
        at += n;
        drain(d, &mut out)?;
    }
    Ok(out)
}

fn concat_frames(bodies: &[Vec<u8>]) -> BytesMut {
    let mut stream = BytesMut::new();
    for b in bodies {
        encode_frame_into(&mut stream, b);
    }
    stream
}

// ---------------------------------------------------------------------------------------------
// (a) member round trip
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn member_round_trip(m in member()) {
        let rec = encode_member(&m);
        let h = if m.host.is_ipv4() { 4 } else { 16 };
        let total = 73 + h + m.command.len() + m.domain.len() + m.payload.len();
        prop_assert_eq!(rec.len(), total);
        prop_assert_eq!(member_record_len(&m), total);
        prop_assert_eq!(&rec[..10], &MEMBER_BEGIN[..]);
        prop_assert_eq!(&rec[total - 10..], &MEMBER_END[..]);

        let (back, used) = decode_member(&rec).unwrap();
        prop_assert_eq!(used, total);
        member_fields_eq(&back, &m)?;
        prop_assert_eq!(back.key(), m.key());
    }

    #[test]
    fn member_decode_ignores_what_follows(m in member(), tail in blob(64)) {
        let mut buf = BytesMut::from(&encode_member(&m)[..]);
        buf.extend_from_slice(&tail);
        let (back, used) = decode_member(&buf.freeze()).unwrap();
        prop_assert_eq!(used, member_record_len(&m));
        member_fields_eq(&back, &m)?;
    }

    #[test]
    fn member_truncated_anywhere_is_an_error(m in member(), cut in any::<prop::sample::Index>()) {
        let rec = encode_member(&m);
        let n = cut.index(rec.len());
        let short = rec.slice(..n);
        prop_assert!(decode_member(&short).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// (b) envelope round trip
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn message_round_trip(msg in message()) {
        let body = msg.encode();
        let m = member_record_len(&msg.sender);
        prop_assert_eq!(body.len(), 24 + 16 + m + msg.payload.len());
        prop_assert_eq!(msg.encoded_len(), body.len());

        let back = ChannelMessage::decode(&body).unwrap();
        message_fields_eq(&back, &msg)?;

        // The framed form is exactly the body inside the §1.1 frame.
        let frame = msg.encode_frame();
        prop_assert_eq!(frame.len(), body.len() + FRAME_OVERHEAD);
        prop_assert_eq!(&frame[..], &encode_frame(&body)[..]);

        let mut d = FrameDecoder::new(body.len());
        d.push(&frame);
        let got = d.next_frame().unwrap().unwrap();
        prop_assert_eq!(&got, &body);
        prop_assert_eq!(d.next_frame().unwrap(), None);
        message_fields_eq(&ChannelMessage::decode(&got).unwrap(), &msg)?;
    }

    #[test]
    fn message_truncated_anywhere_is_an_error(
        msg in message_with(64),
        cut in any::<prop::sample::Index>(),
    ) {
        let body = msg.encode();
        let n = cut.index(body.len());
        prop_assert!(ChannelMessage::decode(&body.slice(..n)).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// (c) stream splitting
// ---------------------------------------------------------------------------------------------

fn bodies() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..=64), 1..=5)
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn frames_cut_at_every_point(bodies in bodies()) {
        let stream = concat_frames(&bodies);
        for cut in 0..=stream.len() {
            let mut d = FrameDecoder::new(64);
            let mut out = Vec::new();
            d.push(&stream[..cut]);
            drain(&mut d, &mut out).unwrap();
            d.push(&stream[cut..]);
            drain(&mut d, &mut out).unwrap();
            prop_assert_eq!(out.len(), bodies.len(), "cut at {}", cut);
            for (got, want) in out.iter().zip(&bodies) {
                prop_assert_eq!(&got[..], &want[..], "cut at {}", cut);
            }
            prop_assert!(!d.has_partial());
            prop_assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn frames_cut_at_every_pair_of_points(bodies in prop::collection::vec(
        prop::collection::vec(any::<u8>(), 0..=8), 1..=3)
    ) {
        let stream = concat_frames(&bodies);
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let mut d = FrameDecoder::new(8);
                let mut out = Vec::new();
                for part in [&stream[..a], &stream[a..b], &stream[b..]] {
                    d.push(part);
                    drain(&mut d, &mut out).unwrap();
                }
                prop_assert_eq!(out.len(), bodies.len());
                for (got, want) in out.iter().zip(&bodies) {
                    prop_assert_eq!(&got[..], &want[..]);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn frames_in_random_chunks(bodies in bodies(), sizes in chunk_sizes(100)) {
        let stream = concat_frames(&bodies);
        let mut d = FrameDecoder::new(64);
        let out = feed_chunked(&mut d, &stream, &sizes).unwrap();
        prop_assert_eq!(out.len(), bodies.len());
        for (got, want) in out.iter().zip(&bodies) {
            prop_assert_eq!(&got[..], &want[..]);
        }
        prop_assert!(!d.has_partial());
    }

    #[test]
    fn frames_one_byte_at_a_time(bodies in bodies()) {
        let stream = concat_frames(&bodies);
        let mut d = FrameDecoder::new(64);
        let out = feed_chunked(&mut d, &stream, &[1]).unwrap();
        prop_assert_eq!(out.len(), bodies.len());
        for (got, want) in out.iter().zip(&bodies) {
            prop_assert_eq!(&got[..], &want[..]);
        }
    }

    #[test]
    fn framed_messages_in_random_chunks(
        msgs in prop::collection::vec(message_with(512), 1..=4),
        sizes in chunk_sizes(400),
    ) {
        let mut stream = BytesMut::new();
        for m in &msgs {
            m.encode_frame_into(&mut stream);
        }
        let mut d = FrameDecoder::new(MAX_BODY);
        let out = feed_chunked(&mut d, &stream, &sizes).unwrap();
        prop_assert_eq!(out.len(), msgs.len());
        for (body, want) in out.iter().zip(&msgs) {
            message_fields_eq(&ChannelMessage::decode(body).unwrap(), want)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (d) hostile input: no panics, bounded buffering
// ---------------------------------------------------------------------------------------------

/// Pieces of a hostile stream.
fn segment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // A valid frame, sometimes over the maximum.
        prop::collection::vec(any::<u8>(), 0..=300).prop_map(|b| encode_frame(&b).to_vec()),
        (MAX_BODY - 40..=MAX_BODY + 40).prop_map(|n| encode_frame(&vec![0x5A; n]).to_vec()),
        // A header announcing any length (negative, huge, around the maximum), then nothing.
        any::<i32>().prop_map(header),
        (MAX_BODY as i32 - 8..=MAX_BODY as i32 + 8).prop_map(header),
        Just(header(i32::MAX)),
        Just(header(i32::MIN)),
        Just(header(-1)),
        // A header announcing a body up to the maximum, followed by junk instead of it.
        (
            0..=MAX_BODY as i32,
            prop::collection::vec(any::<u8>(), 0..=600)
        )
            .prop_map(|(n, junk)| {
                let mut v = header(n);
                v.extend_from_slice(&junk);
                v
            }),
        // Marker prefixes and raw junk.
        (0..=7usize).prop_map(|n| START_MARKER[..n].to_vec()),
        prop::collection::vec(any::<u8>(), 0..=300),
        Just(END_MARKER.to_vec()),
    ]
}

fn header(n: i32) -> Vec<u8> {
    let mut v = START_MARKER.to_vec();
    v.extend_from_slice(&n.to_be_bytes());
    v
}

fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(segment(), 0..=8).prop_map(|segs| segs.concat())
}

/// Feeds `stream` in cycled chunks, drains after every push, and checks the invariants:
/// no panic, errors are sticky, and the buffer's capacity stays within
/// `factor * (max_body + 18 + largest push so far)`.
///
/// The tests use `factor = 1`: the decoder sizes its buffer exactly once a header is known.
fn hostile_feed(stream: &[u8], sizes: &[usize], factor: usize) -> Result<(), TestCaseError> {
    let mut d = FrameDecoder::new(MAX_BODY);
    prop_assert_eq!(d.max_body(), MAX_BODY);
    let mut error: Option<WireError> = None;
    let mut largest_push = 0;
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = sizes[i % sizes.len()].min(stream.len() - at);
        i += 1;
        largest_push = largest_push.max(n);
        d.push(&stream[at..at + n]);
        at += n;
        let bound = factor * (MAX_BODY + FRAME_OVERHEAD + largest_push);
        prop_assert!(
            d.capacity() <= bound,
            "after push: capacity {} > {} (buffered {})",
            d.capacity(),
            bound,
            d.buffered()
        );
        loop {
            match d.next_frame() {
                Ok(Some(body)) => {
                    prop_assert!(error.is_none(), "frame after an error");
                    prop_assert!(body.len() <= MAX_BODY);
                }
                Ok(None) => {
                    prop_assert!(error.is_none(), "error was not sticky");
                    break;
                }
                Err(e) => {
                    if let Some(prev) = &error {
                        prop_assert_eq!(prev, &e, "sticky error changed");
                    }
                    if let WireError::TooLarge { len, max } = e {
                        prop_assert!(len > max);
                        prop_assert_eq!(max, MAX_BODY);
                    }
                    if let WireError::NegativeLength(n) = e {
                        prop_assert!(n < 0);
                    }
                    error = Some(e);
                    break;
                }
            }
        }
        prop_assert!(
            d.capacity() <= bound,
            "after drain: capacity {} > {}",
            d.capacity(),
            bound
        );
        if error.is_some() {
            prop_assert_eq!(d.buffered(), 0, "buffer kept after an error");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn frame_decoder_survives_hostile_streams(
        stream in hostile_stream(),
        sizes in chunk_sizes(700),
    ) {
        hostile_feed(&stream, &sizes, 1)?;
    }

    #[test]
    fn frame_decoder_survives_random_bytes(
        stream in prop::collection::vec(any::<u8>(), 0..=2000),
        sizes in chunk_sizes(300),
    ) {
        hostile_feed(&stream, &sizes, 1)?;
    }

    #[test]

    fn frame_decoder_capacity_strict_bound(
        stream in hostile_stream(),
        sizes in chunk_sizes(700),
    ) {
        hostile_feed(&stream, &sizes, 1)?;
    }

    #[test]
    fn header_length_is_checked_as_soon_as_it_is_complete(
        n in prop_oneof![any::<i32>(), -20..=MAX_BODY as i32 + 20],
        sizes in chunk_sizes(11),
    ) {
        let mut d = FrameDecoder::new(MAX_BODY);
        let result = feed_chunked(&mut d, &header(n), &sizes);
        if n < 0 {
            prop_assert_eq!(result, Err(WireError::NegativeLength(n)));
        } else if n as usize > MAX_BODY {
            prop_assert_eq!(result, Err(WireError::TooLarge { len: n as usize, max: MAX_BODY }));
        } else {
            prop_assert_eq!(result, Ok(Vec::new()));
            prop_assert_eq!(d.buffered(), 11);
        }
        // What was allocated does not depend on the announced length: it is what a header
        // announcing an empty body gets, within one chunk (capped by the maximum).
        let mut reference = FrameDecoder::new(MAX_BODY);
        let _ = feed_chunked(&mut reference, &header(0), &sizes);
        if (0..=MAX_BODY as i64).contains(&i64::from(n)) {
            prop_assert_eq!(d.capacity(), reference.capacity());
        }
        prop_assert!(
            d.capacity() <= FrameDecoder::CHUNK.min(MAX_BODY + 18 + 11),
            "capacity {} for an 11-byte header",
            d.capacity()
        );
    }

    #[test]
    fn ack_decode_never_panics(body in prop::collection::vec(any::<u8>(), 0..=8)) {
        match AckCommand::decode(&body) {
            Ok(AckCommand::Ack) => prop_assert_eq!(&body[..], &ACK_BODY[..]),
            Ok(AckCommand::FailAck) => prop_assert_eq!(&body[..], &FAIL_ACK_BODY[..]),
            Err(e) => {
                prop_assert_eq!(e, WireError::UnknownCommand);
                prop_assert!(body[..] != ACK_BODY[..] && body[..] != FAIL_ACK_BODY[..]);
            }
        }
    }

    #[test]
    fn ack_decode_of_near_misses(which in any::<bool>(), at in 0..3usize, flip in 1..=255u8) {
        let mut body = if which { ACK_BODY } else { FAIL_ACK_BODY };
        body[at] ^= flip;
        let result = AckCommand::decode(&body);
        if body == ACK_BODY {
            prop_assert_eq!(result, Ok(AckCommand::Ack));
        } else if body == FAIL_ACK_BODY {
            prop_assert_eq!(result, Ok(AckCommand::FailAck));
        } else {
            prop_assert_eq!(result, Err(WireError::UnknownCommand));
        }
    }
}

/// Regression: a legitimate header announcing exactly `max_body` bytes, then the body pushed
/// in small reads (the end marker has not arrived yet). Largest push 1000, so the bound is
/// 4096 + 18 + 1000 = 5114; amortized doubling used to reach about 8 KiB.
#[test]
fn frame_decoder_capacity_overshoot_repro() {
    for chunk in [1usize, 16, 1000] {
        let mut d = FrameDecoder::new(MAX_BODY);
        d.push(&header(MAX_BODY as i32));
        let mut largest = 11;
        let mut pushed = 0;
        while pushed < MAX_BODY {
            let n = chunk.min(MAX_BODY - pushed);
            d.push(&vec![0u8; n]);
            pushed += n;
            largest = largest.max(n);
            assert_eq!(d.next_frame(), Ok(None));
            let bound = MAX_BODY + FRAME_OVERHEAD + largest;
            assert!(
                d.capacity() <= bound,
                "{chunk}-byte pushes: capacity {} > {bound} with {} bytes buffered",
                d.capacity(),
                d.buffered()
            );
        }
        d.push(END_MARKER);
        assert_eq!(d.next_frame().unwrap().unwrap().len(), MAX_BODY);
    }
}

/// An edit applied to a valid encoding.
#[derive(Debug, Clone)]
enum Edit {
    Set(prop::sample::Index, u8),
    /// Overwrite 4 bytes with a big-endian i32 (hits length fields when aligned on one).
    SetI32(prop::sample::Index, i32),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                any::<i32>(),
                -20..=400i32,
                Just(i32::MAX),
                Just(i32::MIN),
                Just(-1)
            ]
        )
            .prop_map(|(i, v)| Edit::SetI32(i, v)),
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..=8)
        )
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        (any::<prop::sample::Index>(), 1..=8usize).prop_map(|(i, n)| Edit::Remove(i, n)),
    ]
}

fn apply(buf: &mut Vec<u8>, e: &Edit) {
    let pick = |i: &prop::sample::Index, len: usize| if len == 0 { 0 } else { i.index(len) };
    match e {
        Edit::Set(i, b) => {
            if !buf.is_empty() {
                let at = pick(i, buf.len());
                buf[at] = *b;
            }
        }
        Edit::SetI32(i, v) => {
            if buf.len() >= 4 {
                let at = pick(i, buf.len() - 3);
                buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        Edit::Truncate(i) => {
            let at = pick(i, buf.len() + 1);
            buf.truncate(at);
        }
        Edit::Insert(i, v) => {
            let at = pick(i, buf.len() + 1);
            buf.splice(at..at, v.iter().copied());
        }
        Edit::Remove(i, n) => {
            if !buf.is_empty() {
                let at = pick(i, buf.len());
                let end = (at + n).min(buf.len());
                buf.drain(at..end);
            }
        }
    }
}

/// Offsets of the length fields of a member record that starts at `base`.
fn member_length_offsets(m: &Member, base: usize) -> Vec<usize> {
    let h = if m.host.is_ipv4() { 4 } else { 16 };
    let c_at = base + 35 + h;
    let d_at = c_at + 4 + m.command.len();
    let p_at = d_at + 4 + m.domain.len() + 16;
    vec![base + 10, c_at, d_at, p_at]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn member_decode_never_panics_on_edits(
        m in member(),
        edits in prop::collection::vec(edit(), 1..=4),
    ) {
        let mut buf = encode_member(&m).to_vec();
        for e in &edits {
            apply(&mut buf, e);
        }
        let buf = Bytes::from(buf);
        // Whatever decodes must re-encode to exactly the bytes it came from.
        if let Ok((back, used)) = decode_member(&buf) {
            prop_assert!(used <= buf.len());
            prop_assert_eq!(&encode_member(&back)[..], &buf[..used]);
        }
    }

    #[test]
    fn member_decode_never_panics_on_bad_lengths(
        m in member(),
        field in 0..5usize,
        value in prop_oneof![any::<i32>(), -8..=700i32],
    ) {
        let mut buf = encode_member(&m).to_vec();
        if field == 4 {
            // The signed host length byte.
            buf[34] = value as u8;
        } else {
            let at = member_length_offsets(&m, 0)[field];
            buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
        }
        let buf = Bytes::from(buf);
        if let Ok((back, used)) = decode_member(&buf) {
            prop_assert_eq!(&encode_member(&back)[..], &buf[..used]);
        }
    }

    #[test]
    fn member_decode_never_panics_on_random_bytes(
        tail in prop::collection::vec(any::<u8>(), 0..=200),
        with_marker in any::<bool>(),
    ) {
        let mut buf = if with_marker { MEMBER_BEGIN.to_vec() } else { Vec::new() };
        buf.extend_from_slice(&tail);
        let buf = Bytes::from(buf);
        if let Ok((back, used)) = decode_member(&buf) {
            prop_assert_eq!(&encode_member(&back)[..], &buf[..used]);
        }
    }

    #[test]
    fn message_decode_never_panics_on_edits(
        msg in message_with(128),
        edits in prop::collection::vec(edit(), 1..=4),
    ) {
        let mut buf = msg.encode().to_vec();
        for e in &edits {
            apply(&mut buf, e);
        }
        let buf = Bytes::from(buf);
        if let Ok(back) = ChannelMessage::decode(&buf) {
            prop_assert_eq!(&back.encode()[..], &buf[..]);
        }
    }

    #[test]
    fn message_decode_never_panics_on_bad_lengths(
        msg in message_with(128),
        field in 0..7usize,
        value in prop_oneof![any::<i32>(), -8..=700i32],
    ) {
        let mut buf = msg.encode().to_vec();
        let m = member_record_len(&msg.sender);
        // Envelope length fields: U at 12, M at 32, P at 36 + M; then the member's own.
        let mut offsets = vec![12, 32, 36 + m];
        offsets.extend(member_length_offsets(&msg.sender, 36));
        let at = offsets[field];
        buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
        let buf = Bytes::from(buf);
        if let Ok(back) = ChannelMessage::decode(&buf) {
            prop_assert_eq!(&back.encode()[..], &buf[..]);
        }
    }

    #[test]
    fn message_decode_never_panics_on_random_bytes(
        tail in prop::collection::vec(any::<u8>(), 0..=300),
        prefix in any::<bool>(),
        m in any::<i32>(),
    ) {
        // With `prefix`, get past the unique id check so deeper fields see random data.
        let mut buf = Vec::new();
        if prefix {
            buf.extend_from_slice(&3u32.to_be_bytes());
            buf.extend_from_slice(&0i64.to_be_bytes());
            buf.extend_from_slice(&16i32.to_be_bytes());
            buf.extend_from_slice(&[7; 16]);
            buf.extend_from_slice(&m.to_be_bytes());
            buf.extend_from_slice(MEMBER_BEGIN);
        }
        buf.extend_from_slice(&tail);
        let buf = Bytes::from(buf);
        if let Ok(back) = ChannelMessage::decode(&buf) {
            prop_assert_eq!(&back.encode()[..], &buf[..]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (e) marker corruption
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Marker {
    FrameStart,
    FrameEnd,
    MemberBegin,
    MemberEnd,
}

fn marker() -> impl Strategy<Value = Marker> {
    prop_oneof![
        Just(Marker::FrameStart),
        Just(Marker::FrameEnd),
        Just(Marker::MemberBegin),
        Just(Marker::MemberEnd),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn corrupted_marker_gives_matching_error(
        msg in message_with(256),
        which in marker(),
        pos in 0..10usize,
        flip in 1..=255u8,
        sizes in chunk_sizes(200),
    ) {
        let mut frame = msg.encode_frame().to_vec();
        let m = member_record_len(&msg.sender);
        let member_at = 11 + 36;
        let (at, expected) = match which {
            Marker::FrameStart => (pos % 7, WireError::BadStartMarker),
            Marker::FrameEnd => (frame.len() - 7 + pos % 7, WireError::BadEndMarker),
            Marker::MemberBegin => (member_at + pos, WireError::BadMemberBeginMarker),
            Marker::MemberEnd => (member_at + m - 10 + pos, WireError::BadMemberEndMarker),
        };
        frame[at] ^= flip;

        let mut d = FrameDecoder::new(MAX_BODY);
        let result = feed_chunked(&mut d, &frame, &sizes);
        match which {
            Marker::FrameStart | Marker::FrameEnd => {
                prop_assert_eq!(result, Err(expected.clone()));
                // Sticky, and nothing more is accepted.
                d.push(&msg.encode_frame());
                prop_assert_eq!(d.next_frame(), Err(expected));
            }
            Marker::MemberBegin | Marker::MemberEnd => {
                let bodies = result.unwrap();
                prop_assert_eq!(bodies.len(), 1);
                prop_assert_eq!(ChannelMessage::decode(&bodies[0]).unwrap_err(), expected.clone());
                // The same record on its own gives the same error.
                let record = bodies[0].slice(36..36 + m);
                prop_assert_eq!(decode_member(&record).unwrap_err(), expected);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Issue #4: no datagram, however malformed, panics the membership table or changes it.
    #[test]
    fn membership_table_survives_any_datagram(
        junk in prop::collection::vec(any::<u8>(), 0..200),
        prefix_beacon in any::<bool>(),
    ) {
        use tribes::membership::MembershipTable;
        let local = Member::new("127.0.0.1:4000".parse().unwrap());
        let mut t = MembershipTable::new(local.key(), std::time::Duration::from_secs(3));
        let mut data = if prefix_beacon { b"TRIBES-B\x01\x00".to_vec() } else { Vec::new() };
        data.extend_from_slice(&junk);
        let now = std::time::Instant::now();
        if t.handle_beacon(&Bytes::from(data), now).is_err() {
            prop_assert!(t.members().is_empty());
            prop_assert_eq!(t.malformed(), 1);
        }
        let _ = t.expire(now + std::time::Duration::from_secs(10));
    }
}
