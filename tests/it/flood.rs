//! Floods (issue 7): an unauthorized peer dialing over and over, and a thousand connections
//! that never finish their handshake (a few dripping bytes). The node stays up, refuses the
//! unauthorized peer everything, keeps its memory bounded, and its honest peer keeps
//! syncing.

use futures::StreamExt;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::support::TestNode;
use trackersync::net::wire::pb;

fn peer_of(addr: &Multiaddr) -> PeerId {
    addr.iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .expect("/p2p/ in address")
}

async fn honest_sync_still_works(a: &TestNode, b: &TestNode, name: &str) {
    let (s, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": name}}),
        )
        .await;
    assert_eq!(s, 201, "{item}");
    b.item_when(item["id"].as_str().expect("id"), |_| true)
        .await;
}

#[tokio::test]
async fn floods_of_dials_and_connections_leave_the_node_serving_its_peers() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    a.pair(&b).await;
    a.cases_tracker().await;
    let before = a.latency_to(&b, "before the floods").await;
    let pid = a.child.id().expect("pid");
    let a_addr: Multiaddr = a.p2p_addr().await.parse().expect("addr");
    let a_id = peer_of(&a_addr);

    // 1. An unauthorized peer dials 1,000 times and asks for the feed each time: every
    // connection is closed and it never gets a page.
    let mut intruder = crate::support::plain_sync_swarm();
    let pull = crate::support::pull_from_start();
    let mut pages = 0;
    for _ in 0..1000 {
        intruder.dial(a_addr.clone()).expect("dial");
        loop {
            match intruder.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == a_id => {
                    intruder
                        .behaviour_mut()
                        .send_request(&peer_id, pull.clone().into());
                }
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) => {
                    if matches!(response.body, Some(pb::response::Body::Pull(_))) {
                        pages += 1;
                    }
                }
                SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                }
                | SwarmEvent::OutgoingConnectionError { .. } => break,
                _ => {}
            }
        }
    }
    assert_eq!(pages, 0, "an unauthorized peer got pages of the feed");
    honest_sync_still_works(&a, &b, "after the dials").await;

    // 2. A thousand connections that never finish their handshake, held open while the
    // honest peer syncs; one of them drips a byte at a time.
    let tcp_port = a_addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("tcp port");
    let mut held = Vec::new();
    for _ in 0..1000 {
        match tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await {
            Ok(s) => held.push(s),
            // The node (or this process) may run out of descriptors first; it must still serve.
            Err(_) => break,
        }
    }
    assert!(held.len() >= 100, "only {} connections opened", held.len());
    for (i, s) in held.iter_mut().enumerate().take(10) {
        let _ = s.write_all(&[b'/', i as u8]).await;
    }
    let during = a.latency_to(&b, "while flooded").await;
    println!(
        "{} connections held; honest a -> b latency {before:?} before the floods, {during:?} during",
        held.len()
    );
    crate::support::assert_under_memory_cap(pid, "under the flood");
    drop(held);
    honest_sync_still_works(&a, &b, "after the flood").await;
}
