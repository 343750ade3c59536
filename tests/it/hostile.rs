//! A hostile but authorized peer over a real libp2p connection: malformed and oversized frames,
//! and garbage answers to the node's pulls. The node disconnects it and keeps syncing with an
//! honest peer.

use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, StreamProtocol};
use serde_json::json;

use crate::support::TestNode;

/// Writes whatever bytes it is given (a byte at a time, `drip` apart, when set); reads
/// whatever comes back (bounded).
#[derive(Clone, Default)]
struct RawCodec {
    drip: Option<Duration>,
}

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.take(1 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.take(1 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        match self.drip {
            Some(pause) => {
                for b in req {
                    io.write_all(&[b]).await?;
                    io.flush().await?;
                    tokio::time::sleep(pause).await;
                }
            }
            None => io.write_all(&req).await?,
        }
        io.close().await
    }

    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()> {
        io.write_all(&res).await?;
        io.close().await
    }
}

/// A libp2p node speaking our protocol with raw bytes (it sends whatever it is given),
/// closing connections idle for `idle`.
fn raw_swarm(idle: Duration) -> libp2p::Swarm<request_response::Behaviour<RawCodec>> {
    raw_swarm_with(RawCodec::default(), idle)
}

fn raw_swarm_with(
    codec: RawCodec,
    idle: Duration,
) -> libp2p::Swarm<request_response::Behaviour<RawCodec>> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                codec,
                [(
                    StreamProtocol::new("/trackersync/sync/1"),
                    ProtocolSupport::Full,
                )],
                request_response::Config::default(),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build()
}

/// `node`'s status entry for `peer`, once it shows the peer disconnected (the node records a
/// disconnection on its own loop, a moment after the connection closes).
async fn disconnected_entry(node: &TestNode, peer: &libp2p::PeerId) -> serde_json::Value {
    crate::support::eventually("the node's view of the disconnected peer", || async {
        let (_, peers) = node.get("/api/v1/peers").await;
        peers
            .as_array()?
            .iter()
            .find(|p| p["peer_id"] == peer.to_string() && p["connected"] == false)
            .cloned()
    })
    .await
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn garbage_frames_get_a_peer_disconnected_while_honest_peers_sync() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    a.pair(&b).await;
    a.cases_tracker().await;

    let mut hostile = raw_swarm(Duration::from_secs(60));
    hostile
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
        .expect("listen");
    let listen = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = hostile.select_next_some().await {
            break address;
        }
    };
    let hostile_id = *hostile.local_peer_id();
    // a authorizes the hostile peer (it holds a valid key; it just misbehaves).
    let (s, e) = a
        .post(
            "/api/v1/peers",
            json!({"addr": format!("{listen}/p2p/{hostile_id}")}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let a_addr: Multiaddr = a.p2p_addr().await.parse().expect("addr");
    let a_id = a_addr.iter().last().and_then(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    });
    hostile.dial(a_addr).expect("dial");

    let garbage: Vec<Vec<u8>> = vec![
        frame(&[0xff; 64]),                     // not protobuf (wire type 7)
        u32::MAX.to_be_bytes().to_vec(),        // a frame length far over the limit
        frame(&[0x12, 0x05, 0x0a, 0x03, 0xff]), // truncated nested message
    ];
    let mut sent_at = None;
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match hostile.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if Some(peer_id) == a_id => {
                    sent_at = Some(Instant::now());
                    for g in &garbage {
                        hostile.behaviour_mut().send_request(&peer_id, g.clone());
                    }
                }
                // a pulls from us: answer with garbage too.
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. },
                    ..
                }) => {
                    let _ = hostile
                        .behaviour_mut()
                        .send_response(channel, frame(&[0xff; 32]));
                }
                SwarmEvent::ConnectionClosed {
                    peer_id,
                    num_established: 0,
                    ..
                } if Some(peer_id) == a_id => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a did not disconnect the hostile peer");
    let took = sent_at.expect("connected").elapsed();
    println!("hostile peer disconnected {took:?} after its first garbage");

    let entry = disconnected_entry(&a, &hostile_id).await;
    assert!(
        entry["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{entry}"
    );

    // a is up, and the honest peer still syncs.
    let (s, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "still syncing"}}),
        )
        .await;
    assert_eq!(s, 201);
    b.item_when(item["id"].as_str().expect("id"), |_| true)
        .await;
}

/// Slow-drip frames: an authorized peer opens 32 streams and drips a small, valid-length
/// frame into each, a byte every 200 ms. A frame must arrive at `wire::FRAME_MIN_RATE` after
/// a grace of `wire::FRAME_GRACE` (one second), so the node cuts the peer off as misbehaving,
/// long before its 60-second request timeout, and its honest peer keeps syncing meanwhile.
#[tokio::test]
async fn a_peer_dripping_frames_is_cut_off_and_honest_sync_goes_on() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    a.pair(&b).await;
    a.cases_tracker().await;
    let pid = a.child.id().expect("pid");
    // Honest latency a -> b before the attack, for the figure printed at the end.
    let before = a.latency_to(&b, "before the drip").await;

    let mut dripper = raw_swarm_with(
        RawCodec {
            drip: Some(Duration::from_millis(200)),
        },
        Duration::from_secs(60),
    );
    let dripper_id = *dripper.local_peer_id();
    let (s, e) = a
        .post("/api/v1/peers", json!({"peer_id": dripper_id.to_string()}))
        .await;
    assert_eq!(s, 201, "{e}");
    dripper
        .dial(a.p2p_addr().await.parse::<Multiaddr>().expect("addr"))
        .expect("dial");
    let mut connected_at = None;
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match dripper.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    connected_at = Some(Instant::now());
                    for _ in 0..32 {
                        dripper
                            .behaviour_mut()
                            .send_request(&peer_id, frame(&[0x0a; 60]));
                    }
                }
                SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } => return,
                _ => {}
            }
        }
    });
    // The honest pair syncs while the drip goes on.
    let during = a.latency_to(&b, "during the drip");
    let (cut, during) = tokio::join!(outcome, during);
    assert!(
        cut.is_ok(),
        "the node kept a dripping peer for 30 s (its request timeout is 60 s)"
    );
    let took = connected_at.expect("connected").elapsed();
    let entry = disconnected_entry(&a, &dripper_id).await;
    assert!(
        entry["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("too slowly")),
        "{entry}"
    );
    crate::support::assert_under_memory_cap(pid, "through the drip");
    println!(
        "dripping peer cut off {took:?} after connecting; honest a -> b latency {before:?} before, {during:?} during"
    );
}

/// The fuzz corpus's files under `fuzz/corpus/<target>`.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz corpus")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// An authorized peer floods frames: random bytes, the wire fuzz corpus and mutations of it,
/// and answers every pull with pages of crafted Automerge bytes from the document corpus.
/// Each time it misbehaves it is disconnected; it dials again and goes on. The node stays
/// up with bounded memory and its honest peer keeps syncing. `TRACKERSYNC_HOSTILE_FRAMES`
/// sets the number of frames (default 2,000; the long tier uses 100,000).
#[tokio::test]
async fn a_peer_flooding_hostile_frames_is_cut_off_every_time_and_honest_sync_goes_on() {
    use prost::Message;
    use rand::{Rng, SeedableRng};
    use trackersync::net::wire::pb;

    let total: usize = std::env::var("TRACKERSYNC_HOSTILE_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let wire_corpus = corpus("wire_decode");
    let doc_corpus = corpus("apply_document");
    assert!(!wire_corpus.is_empty() && !doc_corpus.is_empty());

    let a = TestNode::start().await;
    let b = TestNode::start().await;
    a.pair(&b).await;
    a.cases_tracker().await;
    let pid = a.child.id().expect("pid");

    // It drops a connection as soon as it is idle (libp2p's default), as the flood did
    // before: a connection whose frames all happened to be valid ends by itself.
    let mut hostile = raw_swarm(Duration::ZERO);
    let hostile_id = *hostile.local_peer_id();
    let (s, e) = a
        .post("/api/v1/peers", json!({"peer_id": hostile_id.to_string()}))
        .await;
    assert_eq!(s, 201, "{e}");
    let a_addr: Multiaddr = a.p2p_addr().await.parse().expect("addr");

    let before = a.latency_to(&b, "before the flood").await;
    let (mut sent, mut cut_off, mut answered) = (0usize, 0usize, 0usize);
    let mut slowest = Duration::ZERO;
    let flood = async {
        while sent < total {
            hostile.dial(a_addr.clone()).expect("dial");
            let mut first_bad: Option<Instant> = None;
            let outcome = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match hostile.select_next_some().await {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                            for _ in 0..8 {
                                let body = match rng.random_range(0..3) {
                                    0 => (0..rng.random_range(1..256))
                                        .map(|_| rng.random())
                                        .collect(),
                                    1 => {
                                        wire_corpus[rng.random_range(0..wire_corpus.len())].clone()
                                    }
                                    _ => {
                                        let mut m = wire_corpus
                                            [rng.random_range(0..wire_corpus.len())]
                                        .clone();
                                        if !m.is_empty() {
                                            for _ in 0..rng.random_range(1..4) {
                                                let i = rng.random_range(0..m.len());
                                                m[i] = rng.random();
                                            }
                                        }
                                        m
                                    }
                                };
                                hostile.behaviour_mut().send_request(&peer_id, frame(&body));
                                sent += 1;
                            }
                            first_bad.get_or_insert_with(Instant::now);
                        }
                        // a pulls from us: a page of crafted Automerge documents.
                        SwarmEvent::Behaviour(request_response::Event::Message {
                            message: request_response::Message::Request { channel, .. },
                            ..
                        }) => {
                            let entries = (0..4)
                                .map(|_| pb::Entry {
                                    id: uuid::Uuid::now_v7().as_bytes().to_vec(),
                                    kind: pb::DocKind::Item as i32,
                                    tracker: uuid::Uuid::now_v7().as_bytes().to_vec(),
                                    heads: vec![(0..32).map(|_| rng.random()).collect()],
                                    data: doc_corpus[rng.random_range(0..doc_corpus.len())].clone(),
                                    seq: 1,
                                })
                                .collect();
                            let reply = pb::Response {
                                version: 1,
                                body: Some(pb::response::Body::Pull(pb::PullReply {
                                    node: vec![1; 16],
                                    incarnation: vec![2; 16],
                                    last_seq: 1,
                                    more: false,
                                    entries,
                                })),
                            };
                            let _ = hostile
                                .behaviour_mut()
                                .send_response(channel, frame(&reply.encode_to_vec()));
                            answered += 1;
                            sent += 1;
                        }
                        SwarmEvent::ConnectionClosed {
                            num_established: 0, ..
                        } => return true,
                        SwarmEvent::OutgoingConnectionError { .. } => return false,
                        _ => {}
                    }
                }
            })
            .await;
            match outcome {
                Ok(true) => {
                    cut_off += 1;
                    if let Some(t) = first_bad {
                        slowest = slowest.max(t.elapsed());
                    }
                }
                // Refused for a moment after misbehaving (the node pauses a misbehaving peer):
                // dial again.
                Ok(false) => {}
                Err(_) => panic!("the node kept a flooding peer connected for 30 s"),
            }
        }
    };
    // The honest pair syncs while the flood goes on.
    let ((), during) = tokio::join!(flood, a.latency_to(&b, "during the flood"));
    println!(
        "{sent} hostile frames ({answered} crafted pages) over {cut_off} connections; slowest cut-off {slowest:?}; honest a -> b latency {before:?} before, {during:?} during"
    );
    assert!(cut_off > 0);
    assert_eq!(a.get("/api/v1/status").await.0, 200);
    crate::support::assert_under_memory_cap(pid, "through the flood");
    let (s, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "after the flood"}}),
        )
        .await;
    assert_eq!(s, 201, "{item}");
    b.item_when(item["id"].as_str().expect("id"), |_| true)
        .await;
}
