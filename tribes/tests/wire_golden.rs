//! Golden-vector tests for the pure wire codecs.
//!
//! The vectors in `tests/data/*.hex` were written by hand, field by field, from the layout
//! tables of the protocol reference (§1.1 frame, §2.1 envelope, §3.1 member record, §5.1 ACK
//! commands). They were not produced by this crate's encoder, so every test here checks the
//! codec against an independent source in both directions: decode the file and compare each
//! field with values written in the test, and encode those values and compare the bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use tribes::member::SHUTDOWN_COMMAND;
use tribes::wire::{
    decode_member, encode_frame, encode_member, encode_member_into, member_record_len, AckCommand,
    ChannelMessage, FrameDecoder, WireError, ACK_BODY, END_MARKER, FAIL_ACK_BODY, FRAME_OVERHEAD,
    MEMBER_BEGIN, MEMBER_END, START_MARKER,
};
use tribes::{Member, SendOptions, UniqueId};

// ---------------------------------------------------------------------------------------------
// Loading vectors
// ---------------------------------------------------------------------------------------------

/// Parses the hex text format: `#` starts a comment running to the end of the line; the rest
/// is hex digits, two per byte, with any whitespace between bytes.
fn parse_hex(text: &str) -> Vec<u8> {
    let mut digits = Vec::new();
    for line in text.lines() {
        let code = match line.find('#') {
            Some(i) => &line[..i],
            None => line,
        };
        for c in code.chars().filter(|c| !c.is_whitespace()) {
            let d = c
                .to_digit(16)
                .unwrap_or_else(|| panic!("not a hex digit: {c:?} in line {line:?}"));
            digits.push(d as u8);
        }
    }
    assert!(
        digits.len() % 2 == 0,
        "odd number of hex digits ({})",
        digits.len()
    );
    digits.chunks(2).map(|p| (p[0] << 4) | p[1]).collect()
}

fn vector(name: &str) -> Bytes {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "data", name]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    Bytes::from(parse_hex(&text))
}

#[test]
fn hex_parser_handles_comments_and_whitespace() {
    let text = "# heading\n46 4c\t54  # trailing comment\n\n  0a0B # more\n#00 11\n";
    assert_eq!(parse_hex(text), vec![0x46, 0x4c, 0x54, 0x0a, 0x0b]);
}

// ---------------------------------------------------------------------------------------------
// Expected values (written independently of the files)
// ---------------------------------------------------------------------------------------------

const V4_MEMBER_ID: [u8; 16] = [
    0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x47, 0x08, 0x89, 0x9A, 0xAB, 0xBC, 0xCD, 0xDE, 0xEF, 0xF0,
];
const SHUTDOWN_MEMBER_ID: [u8; 16] = [
    0x0F, 0x1E, 0x2D, 0x3C, 0x4B, 0x5A, 0x49, 0x78, 0x87, 0x96, 0xA5, 0xB4, 0xC3, 0xD2, 0xE1, 0xF0,
];
const V6_MEMBER_ID: [u8; 16] = [
    0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x43, 0x21, 0xBF, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66,
];
const MESSAGE_ID: [u8; 16] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x46, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF,
];

/// The member of `member_v4.hex`.
fn expected_v4_member() -> Member {
    Member {
        host: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
        port: 4000,
        secure_port: -1,
        udp_port: -1,
        alive_time: 1_234_567_890_123,
        unique_id: UniqueId(V4_MEMBER_ID),
        command: Bytes::new(),
        domain: Bytes::new(),
        payload: Bytes::new(),
    }
}

/// The member of `member_v4_shutdown.hex`.
fn expected_shutdown_member() -> Member {
    Member {
        host: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 20)),
        port: 4000,
        secure_port: 4443,
        udp_port: 4002,
        alive_time: 0x0102_0304_0506_0708,
        unique_id: UniqueId(SHUTDOWN_MEMBER_ID),
        command: Bytes::from_static(b"BABY-ALEX"),
        domain: Bytes::from_static(b"dom-1"),
        payload: Bytes::from_static(&[0x00, 0xFF, 0x80, 0x7F, 0x10]),
    }
}

/// The member of `member_v6.hex`.
fn expected_v6_member() -> Member {
    Member {
        host: IpAddr::V6(Ipv6Addr::new(
            0x2001, 0x0db8, 0x85a3, 0, 0, 0x8a2e, 0x0370, 0x7334,
        )),
        port: 65535,
        secure_port: -1,
        udp_port: 0,
        alive_time: 42,
        unique_id: UniqueId(V6_MEMBER_ID),
        command: Bytes::new(),
        domain: Bytes::new(),
        payload: Bytes::new(),
    }
}

/// The envelope of `envelope_byte_message_frame.hex`.
fn expected_message() -> ChannelMessage {
    ChannelMessage {
        options: SendOptions::BYTE_MESSAGE | SendOptions::USE_ACK,
        timestamp: 1_700_000_000_000,
        unique_id: UniqueId(MESSAGE_ID),
        sender: expected_v4_member(),
        payload: Bytes::from_static(b"hello tribes"),
    }
}

/// Compares every field (Member's `==` only looks at host, port and unique id).
#[track_caller]
fn assert_member_fields(actual: &Member, expected: &Member) {
    assert_eq!(actual.host, expected.host, "host");
    assert_eq!(actual.port, expected.port, "port");
    assert_eq!(actual.secure_port, expected.secure_port, "secure_port");
    assert_eq!(actual.udp_port, expected.udp_port, "udp_port");
    assert_eq!(actual.alive_time, expected.alive_time, "alive_time");
    assert_eq!(actual.unique_id, expected.unique_id, "unique_id");
    assert_eq!(actual.command, expected.command, "command");
    assert_eq!(actual.domain, expected.domain, "domain");
    assert_eq!(actual.payload, expected.payload, "payload");
}

#[track_caller]
fn assert_message_fields(actual: &ChannelMessage, expected: &ChannelMessage) {
    assert_eq!(actual.options.bits(), expected.options.bits(), "options");
    assert_eq!(actual.timestamp, expected.timestamp, "timestamp");
    assert_eq!(actual.unique_id, expected.unique_id, "unique_id");
    assert_member_fields(&actual.sender, &expected.sender);
    assert_eq!(actual.payload, expected.payload, "payload");
}

/// Byte-for-byte comparison with a readable diff position.
#[track_caller]
fn assert_same_bytes(actual: &[u8], expected: &[u8]) {
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "first difference at byte {i}: got {:02X}, want {:02X}\n got: {:02X?}\nwant: {:02X?}",
            actual[i], expected[i], actual, expected
        );
    }
    assert_eq!(
        actual.len(),
        expected.len(),
        "length differs (common prefix equal)\n got: {actual:02X?}\nwant: {expected:02X?}"
    );
}

// ---------------------------------------------------------------------------------------------
// ACK commands (§5.1)
// ---------------------------------------------------------------------------------------------

fn check_ack_vector(file: &str, cmd: AckCommand, body: [u8; 3]) {
    let bytes = vector(file);
    assert_eq!(bytes.len(), 21);

    // Encode: the constant frame, the body constant, and the generic frame encoder agree.
    assert_same_bytes(&cmd.frame(), &bytes);
    assert_eq!(cmd.body(), body);
    assert_same_bytes(&encode_frame(&body), &bytes);

    // Decode: through the stream decoder, then the command decoder.
    let mut d = FrameDecoder::new(16);
    d.push(&bytes);
    let got = d.next_frame().unwrap().expect("one complete frame");
    assert_eq!(&got[..], &body[..]);
    assert_eq!(AckCommand::decode(&got).unwrap(), cmd);
    assert_eq!(d.next_frame().unwrap(), None);
    assert_eq!(d.buffered(), 0);
    assert!(!d.has_partial());
}

#[test]
fn ack_frame_golden() {
    assert_eq!(ACK_BODY, [0x06, 0x02, 0x03]);
    check_ack_vector("ack_frame.hex", AckCommand::Ack, [0x06, 0x02, 0x03]);
}

#[test]
fn fail_ack_frame_golden() {
    assert_eq!(FAIL_ACK_BODY, [0x0B, 0x00, 0x05]);
    check_ack_vector(
        "fail_ack_frame.hex",
        AckCommand::FailAck,
        [0x0B, 0x00, 0x05],
    );
}

#[test]
fn ack_decode_refuses_other_bodies() {
    for body in [
        &[][..],
        &[0x06, 0x02],
        &[0x06, 0x02, 0x04],
        &[0x06, 0x02, 0x03, 0x00],
        &[0x0B, 0x00, 0x06],
        &[0x00, 0x00, 0x00],
    ] {
        assert_eq!(
            AckCommand::decode(body),
            Err(WireError::UnknownCommand),
            "{body:02X?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Member records (§3.1)
// ---------------------------------------------------------------------------------------------

fn check_member_vector(file: &str, expected: &Member, expected_len: usize) {
    let bytes = vector(file);
    assert_eq!(bytes.len(), expected_len, "vector length");

    // Decode.
    let (got, used) = decode_member(&bytes).unwrap();
    assert_eq!(used, expected_len);
    assert_member_fields(&got, expected);

    // Encode, both ways.
    assert_eq!(member_record_len(expected), expected_len);
    assert_same_bytes(&encode_member(expected), &bytes);
    let mut buf = BytesMut::from(&b"prefix"[..]);
    encode_member_into(&mut buf, expected);
    assert_eq!(&buf[..6], b"prefix");
    assert_same_bytes(&buf[6..], &bytes);

    // Decoding stops at the record: trailing bytes after it are not consumed.
    let mut longer = BytesMut::from(&bytes[..]);
    longer.extend_from_slice(b"more");
    let (again, used) = decode_member(&longer.freeze()).unwrap();
    assert_eq!(used, expected_len);
    assert_member_fields(&again, expected);
}

#[test]
fn member_v4_golden() {
    let m = expected_v4_member();
    check_member_vector("member_v4.hex", &m, 77);
    assert!(!m.is_shutting_down());
}

#[test]
fn member_v4_shutdown_golden() {
    let m = expected_shutdown_member();
    check_member_vector("member_v4_shutdown.hex", &m, 96);
    let (got, _) = decode_member(&vector("member_v4_shutdown.hex")).unwrap();
    assert!(got.is_shutting_down());
    assert_eq!(&got.command[..], SHUTDOWN_COMMAND);
}

#[test]
fn member_v6_golden() {
    check_member_vector("member_v6.hex", &expected_v6_member(), 89);
}

#[test]
fn member_markers_match_reference() {
    assert_eq!(
        MEMBER_BEGIN,
        &[0x54, 0x52, 0x49, 0x42, 0x45, 0x53, 0x2D, 0x42, 0x01, 0x00]
    );
    assert_eq!(
        MEMBER_END,
        &[0x54, 0x52, 0x49, 0x42, 0x45, 0x53, 0x2D, 0x45, 0x01, 0x00]
    );
    assert_eq!(START_MARKER, &[0x46, 0x4C, 0x54, 0x32, 0x30, 0x30, 0x32]);
    assert_eq!(END_MARKER, &[0x54, 0x4C, 0x46, 0x32, 0x30, 0x30, 0x33]);
    assert_eq!(FRAME_OVERHEAD, 18);
}

#[test]
fn member_size_formula() {
    // §3.1: total = 73 + h + c + d + p; L = total - 24.
    for (host, h) in [
        (IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 4usize),
        (IpAddr::V6(Ipv6Addr::LOCALHOST), 16),
    ] {
        for c in [0usize, 1, 9, 300] {
            for d in [0usize, 5, 128] {
                for p in [0usize, 2, 1000] {
                    let mut m = Member::with_id(
                        std::net::SocketAddr::new(host, 4000),
                        UniqueId(V4_MEMBER_ID),
                    );
                    m.command = Bytes::from(vec![b'c'; c]);
                    m.domain = Bytes::from(vec![b'd'; d]);
                    m.payload = Bytes::from(vec![b'p'; p]);
                    let total = 73 + h + c + d + p;
                    assert_eq!(member_record_len(&m), total);
                    let rec = encode_member(&m);
                    assert_eq!(rec.len(), total);
                    let l = i32::from_be_bytes([rec[10], rec[11], rec[12], rec[13]]);
                    assert_eq!(l as usize, total - 24);
                    assert_eq!(rec[34] as usize, h);
                    let (back, used) = decode_member(&rec).unwrap();
                    assert_eq!(used, total);
                    assert_member_fields(&back, &m);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope (§2.1) inside a frame (§1.1)
// ---------------------------------------------------------------------------------------------

#[test]
fn envelope_frame_golden_decode() {
    let frame = vector("envelope_byte_message_frame.hex");
    assert_eq!(frame.len(), 147);
    let expected = expected_message();

    // Stream decoder yields the 129-byte body.
    let mut d = FrameDecoder::new(1024);
    d.push(&frame);
    let body = d.next_frame().unwrap().expect("complete frame");
    assert_eq!(body.len(), 129);
    assert_eq!(&body[..], &frame[11..frame.len() - 7]);
    assert_eq!(d.next_frame().unwrap(), None);
    assert!(!d.has_partial());

    let msg = ChannelMessage::decode(&body).unwrap();
    assert_message_fields(&msg, &expected);
    assert!(msg.options.contains(SendOptions::BYTE_MESSAGE));
    assert!(msg.options.wants_ack());
    assert!(!msg.options.wants_ack_after_processing());

    // The embedded sender record is byte-identical to the standalone vector.
    let member = vector("member_v4.hex");
    assert_same_bytes(&body[36..36 + 77], &member);
}

#[test]
fn envelope_frame_golden_encode() {
    let frame = vector("envelope_byte_message_frame.hex");
    let msg = expected_message();

    assert_eq!(msg.encoded_len(), 129);
    assert_same_bytes(&msg.encode(), &frame[11..frame.len() - 7]);
    assert_same_bytes(&msg.encode_frame(), &frame);
    assert_same_bytes(&encode_frame(&msg.encode()), &frame);

    let mut buf = BytesMut::from(&b"xy"[..]);
    msg.encode_into(&mut buf);
    assert_eq!(&buf[..2], b"xy");
    assert_same_bytes(&buf[2..], &frame[11..frame.len() - 7]);

    let mut buf = BytesMut::from(&b"z"[..]);
    msg.encode_frame_into(&mut buf);
    assert_eq!(&buf[..1], b"z");
    assert_same_bytes(&buf[1..], &frame);
}

#[test]
fn envelope_overhead_is_117_and_135_framed() {
    // §2.1: 16-byte id + IPv4 member with empty c/d/p (77) + empty payload.
    let mut msg = expected_message();
    msg.payload = Bytes::new();
    assert_eq!(member_record_len(&msg.sender), 77);
    assert_eq!(msg.encoded_len(), 117);
    assert_eq!(msg.encode().len(), 117);
    assert_eq!(msg.encode_frame().len(), 135);

    // Body = 24 + U + M + P in general.
    for p in [0usize, 1, 12, 4096] {
        for sender in [
            expected_v4_member(),
            expected_shutdown_member(),
            expected_v6_member(),
        ] {
            let m = member_record_len(&sender);
            let msg = ChannelMessage {
                payload: Bytes::from(vec![0xAB; p]),
                sender,
                ..expected_message()
            };
            assert_eq!(msg.encoded_len(), 24 + 16 + m + p);
            assert_eq!(msg.encode().len(), 24 + 16 + m + p);
            assert_eq!(msg.encode_frame().len(), 24 + 16 + m + p + 18);
        }
    }

    // The two other members' sizes follow §3.1 as well.
    assert_eq!(
        member_record_len(&expected_shutdown_member()),
        73 + 4 + 9 + 5 + 5
    );
    assert_eq!(member_record_len(&expected_v6_member()), 73 + 16);
}

#[test]
fn envelope_with_each_golden_member_round_trips() {
    for sender in [
        expected_v4_member(),
        expected_shutdown_member(),
        expected_v6_member(),
    ] {
        let msg = ChannelMessage {
            sender,
            ..expected_message()
        };
        let body = msg.encode();
        let back = ChannelMessage::decode(&body).unwrap();
        assert_message_fields(&back, &msg);
    }
}

#[test]
fn envelope_golden_edits_give_precise_errors() {
    let frame = vector("envelope_byte_message_frame.hex");
    let body = frame.slice(11..frame.len() - 7);

    // Unique id length other than 16 (offset 12).
    let mut b = BytesMut::from(&body[..]);
    b[12..16].copy_from_slice(&15i32.to_be_bytes());
    assert_eq!(
        ChannelMessage::decode(&b.freeze()),
        Err(WireError::BadUniqueIdLength(15))
    );

    // Negative member length (offset 32).
    let mut b = BytesMut::from(&body[..]);
    b[32..36].copy_from_slice(&(-1i32).to_be_bytes());
    assert!(matches!(
        ChannelMessage::decode(&b.freeze()),
        Err(WireError::BadLength { value: -1, .. })
    ));

    // Negative payload length (offset 36 + 77).
    let mut b = BytesMut::from(&body[..]);
    b[113..117].copy_from_slice(&(-5i32).to_be_bytes());
    assert!(matches!(
        ChannelMessage::decode(&b.freeze()),
        Err(WireError::BadLength { value: -5, .. })
    ));

    // A trailing byte after the payload.
    let mut b = BytesMut::from(&body[..]);
    b.extend_from_slice(&[0]);
    assert!(matches!(
        ChannelMessage::decode(&b.freeze()),
        Err(WireError::TrailingBytes { extra: 1, .. })
    ));

    // Payload cut short.
    let cut = body.slice(..body.len() - 1);
    assert!(matches!(
        ChannelMessage::decode(&cut),
        Err(WireError::Truncated { .. })
    ));

    // Member host length 5 (offset 36 + 34).
    let mut b = BytesMut::from(&body[..]);
    b[70] = 5;
    assert_eq!(
        ChannelMessage::decode(&b.freeze()),
        Err(WireError::BadHostLength(5))
    );

    // Member port 70000 (offset 36 + 22).
    let mut b = BytesMut::from(&body[..]);
    b[58..62].copy_from_slice(&70000i32.to_be_bytes());
    assert_eq!(
        ChannelMessage::decode(&b.freeze()),
        Err(WireError::BadPort(70000))
    );

    // M = 0 (§12 item 4: an invalid record, never accepted).
    let mut b = BytesMut::from(&body[..36]);
    b[32..36].copy_from_slice(&0i32.to_be_bytes());
    b.extend_from_slice(&body[36 + 77..]);
    assert!(ChannelMessage::decode(&b.freeze()).is_err());
}

#[test]
fn frame_decoder_takes_golden_frames_back_to_back() {
    let mut all = BytesMut::new();
    all.extend_from_slice(&vector("ack_frame.hex"));
    all.extend_from_slice(&vector("envelope_byte_message_frame.hex"));
    all.extend_from_slice(&vector("fail_ack_frame.hex"));
    let mut d = FrameDecoder::new(4096);
    d.push(&all);
    assert_eq!(&d.next_frame().unwrap().unwrap()[..], &ACK_BODY[..]);
    let body = d.next_frame().unwrap().unwrap();
    assert_message_fields(&ChannelMessage::decode(&body).unwrap(), &expected_message());
    assert_eq!(&d.next_frame().unwrap().unwrap()[..], &FAIL_ACK_BODY[..]);
    assert_eq!(d.next_frame().unwrap(), None);
}

#[test]
fn frame_decoder_enforces_max_body_on_golden_frame() {
    let frame = vector("envelope_byte_message_frame.hex");
    let mut d = FrameDecoder::new(128);
    d.push(&frame[..11]);
    assert_eq!(
        d.next_frame(),
        Err(WireError::TooLarge { len: 129, max: 128 })
    );
    let mut d = FrameDecoder::new(129);
    d.push(&frame);
    assert_eq!(d.next_frame().unwrap().unwrap().len(), 129);
}
