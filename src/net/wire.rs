//! The wire edge: generated protobuf types, size limits, a length-prefixed codec for
//! libp2p request-response, and conversions that validate every field before the rest of the
//! node sees it.

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::StreamProtocol;
use prost::Message;
use uuid::Uuid;

use crate::repo::RemoteDoc;
use crate::store::DocKind;

#[allow(clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/trackersync.v1.rs"));
}

/// Protocol version we speak; requests from other versions are refused.
pub const VERSION: u32 = 1;
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/trackersync/sync/1");
/// The same messages with each frame's payload raw-deflated (fast level). Offered first and
/// taken when both sides speak it: a page of changes repeats the same ids, actor, node and
/// field names entry after entry, and a node catching up over a slow link pays for bytes.
/// Frame limits hold for the compressed frame and for what it inflates to.
pub const PROTOCOL_DEFLATE: StreamProtocol = StreamProtocol::new("/trackersync/sync/1/deflate");
/// Largest request frame (requests carry ids and heads only).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest response frame; pull pages are cut well below it (see `PULL_MAX_BYTES`).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Data a pull page aims to carry.
pub const PULL_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Entries per pull page.
pub const PULL_MAX_ENTRIES: usize = 2000;
/// Heads one document may list (honest documents have a handful).
pub const MAX_HEADS: usize = 64;
/// Documents one fetch may name.
pub const MAX_FETCH: usize = 2000;
/// Bytes of one document's data.
pub const MAX_DOC_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("invalid message from peer: {0}")]
pub struct WireError(pub String);

fn bad(m: impl Into<String>) -> WireError {
    WireError(m.into())
}

pub fn uuid(b: &[u8], what: &str) -> Result<Uuid, WireError> {
    let arr: [u8; 16] = b
        .try_into()
        .map_err(|_| bad(format!("{what} is not 16 bytes")))?;
    Ok(Uuid::from_bytes(arr))
}

pub fn heads(hs: &[Vec<u8>]) -> Result<Vec<[u8; 32]>, WireError> {
    if hs.len() > MAX_HEADS {
        return Err(bad(format!("{} heads (at most {MAX_HEADS})", hs.len())));
    }
    hs.iter()
        .map(|h| {
            h.as_slice()
                .try_into()
                .map_err(|_| bad("a head is not 32 bytes"))
        })
        .collect()
}

pub fn doc_from_wire(e: pb::Entry) -> Result<RemoteDoc, WireError> {
    let kind = match pb::DocKind::try_from(e.kind) {
        Ok(pb::DocKind::Tracker) => DocKind::Tracker,
        Ok(pb::DocKind::Item) => DocKind::Item,
        _ => return Err(bad(format!("unknown document kind {}", e.kind))),
    };
    if e.data.len() > MAX_DOC_BYTES {
        return Err(bad("document data over the limit"));
    }
    let heads = heads(&e.heads)?;
    if heads.is_empty() {
        return Err(bad("a document without heads"));
    }
    Ok(RemoteDoc {
        id: uuid(&e.id, "document id")?,
        kind,
        tracker: uuid(&e.tracker, "tracker id")?,
        heads,
        data: e.data,
        seq: e.seq,
    })
}

pub fn doc_to_wire(d: RemoteDoc) -> pb::Entry {
    pb::Entry {
        id: d.id.as_bytes().to_vec(),
        kind: match d.kind {
            DocKind::Tracker => pb::DocKind::Tracker,
            DocKind::Item => pb::DocKind::Item,
        } as i32,
        tracker: d.tracker.as_bytes().to_vec(),
        heads: d.heads.into_iter().map(|h| h.to_vec()).collect(),
        data: d.data,
        seq: d.seq,
    }
}

/// Sync bytes this process has read and written (frames, with their length prefixes).
pub static BYTES_IN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static BYTES_OUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Messages written, and their encoded bytes before any compression.
pub static MESSAGES_OUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static PAYLOAD_OUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Of those, messages written plain (to peers without the deflate protocol).
pub static PLAIN_OUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A request as it crosses the wire. What we send is always `Msg`. What we receive is
/// `Garbled` when the frame was over the limit or undecodable, and `Slow` when it arrived
/// slower than [`FRAME_MIN_RATE`] allows: libp2p reports a failed inbound read only in a
/// debug log, so as an error the node would never learn of either.
#[derive(Debug, Clone)]
pub enum Req {
    Msg(pb::Request),
    Garbled(String),
    Slow(String),
}

impl From<pb::Request> for Req {
    fn from(r: pb::Request) -> Req {
        Req::Msg(r)
    }
}

/// Length-prefixed (u32 BE) protobuf frames, size-checked before anything is allocated.
#[derive(Clone, Default)]
pub struct Codec;

/// Time a frame gets beyond what its length needs at [`FRAME_MIN_RATE`].
pub const FRAME_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// Slowest pace (bytes per second) a frame may arrive at. A peer dripping a frame byte by
/// byte holds a stream and its buffer; past this it counts as misbehaving (an undecodable
/// frame) and is disconnected, not left to the 60-second request timeout.
pub const FRAME_MIN_RATE: u64 = 32 * 1024;

fn too_slow(got: usize, len: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("frame arrived too slowly ({got} of {len} bytes in time)"),
    )
}

/// Read one length-prefixed frame. `from_start`: whether the clock starts when the stream
/// opens (requests, written at once) rather than at the length prefix (a response may take
/// the peer a while to prepare, which the request timeout bounds). Either way the frame must
/// be complete [`FRAME_GRACE`] plus its length at [`FRAME_MIN_RATE`] after the clock starts.
/// Memory follows the bytes that arrive, not the length a peer declares.
async fn read_frame<T: futures::AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
    from_start: bool,
) -> std::io::Result<Vec<u8>> {
    let started = tokio::time::Instant::now();
    let mut len = [0u8; 4];
    if from_start {
        tokio::time::timeout_at(started + FRAME_GRACE, io.read_exact(&mut len))
            .await
            .map_err(|_| too_slow(0, 4))??;
    } else {
        io.read_exact(&mut len).await?;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes over the {max}-byte limit"),
        ));
    }
    let deadline = if from_start {
        started
    } else {
        tokio::time::Instant::now()
    } + FRAME_GRACE
        + std::time::Duration::from_millis(len as u64 * 1000 / FRAME_MIN_RATE);
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    let mut body = (&mut *io).take(len as u64);
    let read = tokio::time::timeout_at(deadline, body.read_to_end(&mut buf)).await;
    read.map_err(|_| too_slow(buf.len(), len))??;
    if buf.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("frame cut short ({} of {len} bytes)", buf.len()),
        ));
    }
    BYTES_IN.fetch_add(4 + len as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(buf)
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: Vec<u8>,
    max: usize,
) -> std::io::Result<()> {
    if bytes.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("frame of {} bytes over the {max}-byte limit", bytes.len()),
        ));
    }
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    BYTES_OUT.fetch_add(4 + bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    io.close().await
}

fn deflates(protocol: &StreamProtocol) -> bool {
    protocol.as_ref() == PROTOCOL_DEFLATE.as_ref()
}

fn invalid(m: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m)
}

/// A message's frame payload: its encoding, deflated on the deflate protocol. The limit is
/// checked on the encoding, so what a peer inflates never exceeds it either.
fn pack<M: Message>(m: &M, protocol: &StreamProtocol, max: usize) -> std::io::Result<Vec<u8>> {
    let bytes = m.encode_to_vec();
    if bytes.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("message of {} bytes over the {max}-byte limit", bytes.len()),
        ));
    }
    use std::sync::atomic::Ordering::Relaxed;
    MESSAGES_OUT.fetch_add(1, Relaxed);
    PAYLOAD_OUT.fetch_add(bytes.len() as u64, Relaxed);
    if !deflates(protocol) {
        PLAIN_OUT.fetch_add(1, Relaxed);
        return Ok(bytes);
    }
    use std::io::Write;
    let mut z = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(bytes.len() / 2 + 64),
        flate2::Compression::fast(),
    );
    z.write_all(&bytes)?;
    z.finish()
}

/// A frame payload back to a message: inflated on the deflate protocol, never past `max`
/// bytes (a peer's compression bomb is an undecodable frame), then decoded.
fn unpack<M: Message + Default>(
    frame: Vec<u8>,
    protocol: &StreamProtocol,
    max: usize,
) -> std::io::Result<M> {
    if !deflates(protocol) {
        return decode(&frame);
    }
    use std::io::Read;
    let mut out = Vec::with_capacity((frame.len() * 4).min(max));
    flate2::read::DeflateDecoder::new(frame.as_slice())
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| invalid(format!("bad compressed frame: {e}")))?;
    if out.len() > max {
        return Err(invalid(format!("frame inflates past the {max}-byte limit")));
    }
    decode(&out)
}

pub(crate) fn unpack_deflated<M: Message + Default>(
    frame: Vec<u8>,
    max: usize,
) -> std::io::Result<M> {
    unpack(frame, &PROTOCOL_DEFLATE, max)
}

fn decode<M: Message + Default>(b: &[u8]) -> std::io::Result<M> {
    M::decode(b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = pb::Response;

    async fn read_request<T>(&mut self, p: &StreamProtocol, io: &mut T) -> std::io::Result<Req>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let read = read_frame(io, MAX_REQUEST_BYTES, true).await;
        match read.and_then(|frame| unpack(frame, p, MAX_REQUEST_BYTES)) {
            Ok(r) => Ok(Req::Msg(r)),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Ok(Req::Garbled(e.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(Req::Slow(e.to_string())),
            Err(e) => Err(e),
        }
    }

    async fn read_response<T>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<pb::Response>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, MAX_RESPONSE_BYTES, false).await?;
        unpack(frame, p, MAX_RESPONSE_BYTES)
    }

    async fn write_request<T>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
        req: Req,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        match req {
            Req::Msg(r) => {
                let payload = pack(&r, p, MAX_REQUEST_BYTES)?;
                write_frame(io, payload, MAX_REQUEST_BYTES).await
            }
            Req::Garbled(_) | Req::Slow(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a garbled or slow request is only ever received",
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
        res: pb::Response,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        let payload = pack(&res, p, MAX_RESPONSE_BYTES)?;
        write_frame(io, payload, MAX_RESPONSE_BYTES).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_refuse_malformed_fields() {
        let good = pb::Entry {
            id: vec![1; 16],
            kind: pb::DocKind::Item as i32,
            tracker: vec![2; 16],
            heads: vec![vec![3; 32]],
            data: vec![0; 10],
            seq: 4,
        };
        assert!(doc_from_wire(good.clone()).is_ok());
        let cases = [
            pb::Entry {
                id: vec![1; 15],
                ..good.clone()
            },
            pb::Entry {
                kind: 0,
                ..good.clone()
            },
            pb::Entry {
                kind: 99,
                ..good.clone()
            },
            pb::Entry {
                heads: vec![],
                ..good.clone()
            },
            pb::Entry {
                heads: vec![vec![3; 31]],
                ..good.clone()
            },
            pb::Entry {
                heads: vec![vec![3; 32]; MAX_HEADS + 1],
                ..good.clone()
            },
            pb::Entry {
                tracker: vec![],
                ..good.clone()
            },
        ];
        for c in cases {
            assert!(doc_from_wire(c.clone()).is_err(), "{c:?}");
        }
    }

    fn page(n: usize) -> pb::Response {
        let entry = |i: usize| pb::Entry {
            id: (i as u128).to_be_bytes().to_vec(),
            kind: pb::DocKind::Item as i32,
            tracker: vec![2; 16],
            heads: vec![vec![3; 32]],
            data: b"status open priority high assignee amina".repeat(3),
            seq: i as u64,
        };
        pb::Response {
            version: VERSION,
            body: Some(pb::response::Body::Pull(pb::PullReply {
                entries: (0..n).map(entry).collect(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn deflated_frames_round_trip_smaller_and_plain_ones_unchanged() {
        let msg = page(200);
        let plain = pack(&msg, &PROTOCOL, MAX_RESPONSE_BYTES).expect("plain");
        assert_eq!(plain, msg.encode_to_vec());
        let packed = pack(&msg, &PROTOCOL_DEFLATE, MAX_RESPONSE_BYTES).expect("deflate");
        assert!(
            packed.len() * 3 < plain.len(),
            "{} -> {}",
            plain.len(),
            packed.len()
        );
        let back: pb::Response =
            unpack(packed, &PROTOCOL_DEFLATE, MAX_RESPONSE_BYTES).expect("inflate");
        assert_eq!(back, msg);
    }

    #[test]
    fn a_compression_bomb_or_garbage_is_undecodable_not_inflated() {
        // 64 MiB of zeros deflate to about 64 KiB; the limit stops inflation just past it.
        use std::io::Write;
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 64 << 20]).expect("deflate");
        let bomb = z.finish().expect("deflate");
        assert!(bomb.len() < MAX_REQUEST_BYTES);
        let err =
            unpack::<pb::Request>(bomb, &PROTOCOL_DEFLATE, MAX_REQUEST_BYTES).expect_err("bomb");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("inflates past"), "{err}");
        let err = unpack::<pb::Request>(vec![0xff; 100], &PROTOCOL_DEFLATE, MAX_REQUEST_BYTES)
            .expect_err("garbage");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn an_oversized_message_is_refused_before_compression() {
        let err = pack(&page(20_000), &PROTOCOL_DEFLATE, MAX_REQUEST_BYTES).expect_err("big");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn frames_over_the_limit_are_refused_before_allocation() {
        let mut frame = (u32::MAX).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 8]);
        let mut io = futures::io::Cursor::new(frame);
        let err = read_frame(&mut io, MAX_REQUEST_BYTES, true)
            .await
            .expect_err("over limit");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_early_end_not_garbage() {
        let mut frame = (1024u32 * 1024).to_be_bytes().to_vec();
        frame.extend_from_slice(&[7; 10]);
        let mut io = futures::io::Cursor::new(frame);
        let err = read_frame(&mut io, MAX_REQUEST_BYTES, true)
            .await
            .expect_err("short");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// Yields its bytes, then never anything more (a peer that stopped sending).
    struct Stalls(futures::io::Cursor<Vec<u8>>);

    impl futures::AsyncRead for Stalls {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
                std::task::Poll::Ready(Ok(0)) => std::task::Poll::Pending,
                other => other,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_frame_is_garbage_after_its_deadline() {
        // Nothing at all, then a prefix with part of the body.
        let mut partial = 100u32.to_be_bytes().to_vec();
        partial.extend_from_slice(&[1; 40]);
        for bytes in [vec![], vec![0, 0], partial] {
            let started = tokio::time::Instant::now();
            let mut io = Stalls(futures::io::Cursor::new(bytes));
            let err = read_frame(&mut io, MAX_REQUEST_BYTES, true)
                .await
                .expect_err("stalled");
            assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
            assert!(err.to_string().contains("too slowly"), "{err}");
            // The deadline counts from the stream's start: about a second for a small frame.
            let waited = started.elapsed();
            assert!(
                waited >= FRAME_GRACE && waited < FRAME_GRACE * 2,
                "{waited:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_may_take_its_time_to_start() {
        // No prefix deadline for responses: the request timeout bounds the wait instead.
        let mut io = Stalls(futures::io::Cursor::new(vec![]));
        let waited = tokio::time::timeout(
            FRAME_GRACE * 10,
            read_frame(&mut io, MAX_RESPONSE_BYTES, false),
        )
        .await;
        assert!(
            waited.is_err(),
            "gave up on a response that had not started"
        );
    }
}
