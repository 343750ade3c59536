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

/// Writes whatever bytes it is given; reads whatever comes back (bounded).
#[derive(Clone, Default)]
struct RawCodec;

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
        io.write_all(&req).await?;
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

    let mut hostile = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    StreamProtocol::new("/trackersync/sync/1"),
                    ProtocolSupport::Full,
                )],
                request_response::Config::default(),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
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

    // a records the disconnection on its own loop; wait for its view to catch up.
    let entry = crate::support::eventually("a's view of the hostile peer", || async {
        let (_, peers) = a.get("/api/v1/peers").await;
        peers
            .as_array()?
            .iter()
            .find(|p| p["peer_id"] == hostile_id.to_string() && p["connected"] == false)
            .cloned()
    })
    .await;
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
