//! UDP: a session per client, each with its own socket connected to the chosen endpoint;
//! replies go back from the listener's address; a session ends after `udp_idle_timeout`
//! without traffic in either direction.

use super::balance::Backends;
use super::stats::{dec, inc};
use super::Shared;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::watch;

struct Session {
    upstream: Arc<UdpSocket>,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: Arc<AtomicU64>,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Session>>>;

pub async fn serve(
    socket: UdpSocket,
    backends: Arc<ArcSwap<Backends>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let socket = Arc::new(socket);
    let sessions: Sessions = Arc::default();
    let epoch = Instant::now();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.changed() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        inc(&shared.stats.udp_datagrams);
        let now = epoch.elapsed().as_millis() as u64;
        let existing = sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&peer).map(|s| (s.upstream.clone(), s.last.clone())));
        let upstream = match existing {
            Some((up, last)) => {
                last.store(now, Ordering::Relaxed);
                up
            }
            None => match open(&socket, &sessions, peer, &backends, &shared, epoch).await {
                Some(up) => up,
                None => {
                    inc(&shared.stats.udp_dropped);
                    continue;
                }
            },
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// Start a session for `peer`: a socket connected to its endpoint and a task relaying replies.
async fn open(
    listener: &Arc<UdpSocket>,
    sessions: &Sessions,
    peer: SocketAddr,
    backends: &ArcSwap<Backends>,
    shared: &Arc<Shared>,
    epoch: Instant,
) -> Option<Arc<UdpSocket>> {
    if shared.stats.udp_active.load(Ordering::Relaxed) >= shared.config.max_udp_sessions as u64 {
        return None;
    }
    let table = backends.load_full();
    let ep = *table.order(peer.ip()).first()?;
    let local: SocketAddr = if ep.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let upstream = Arc::new(UdpSocket::bind(local).await.ok()?);
    upstream.connect(ep).await.ok()?;
    table.pin(peer.ip(), ep);
    let last = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
    sessions.lock().ok()?.insert(
        peer,
        Session {
            upstream: upstream.clone(),
            last: last.clone(),
        },
    );
    inc(&shared.stats.udp_sessions);
    inc(&shared.stats.udp_active);
    let (listener, sessions, shared) = (listener.clone(), sessions.clone(), shared.clone());
    let up = upstream.clone();
    tokio::spawn(async move {
        let idle = shared.config.udp_idle_timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            match tokio::time::timeout(idle, up.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                    let _ = listener.send_to(&buf[..n], peer).await;
                }
                Ok(Err(_)) => break, // e.g. the endpoint's port is closed (ICMP)
                Err(_) => {
                    let quiet = epoch.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                    if quiet >= idle.as_millis() as u64 {
                        break;
                    }
                }
            }
        }
        if let Ok(mut s) = sessions.lock() {
            s.remove(&peer);
        }
        dec(&shared.stats.udp_active);
    });
    Some(upstream)
}
