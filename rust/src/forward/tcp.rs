//! TCP: accept, connect to an endpoint (the next one on failure), then relay both ways.

use super::balance::Backends;
use super::relay::Ended;
use super::stats::{dec, inc};
use super::workers::{Load, Pool};
use super::Shared;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::sync::OwnedSemaphorePermit;

pub async fn serve(
    listener: TcpListener,
    backends: Arc<ArcSwap<Backends>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                let Ok((client, peer)) = accepted else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                inc(&shared.stats.tcp_accepted);
                let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                    inc(&shared.stats.tcp_over_limit);
                    reset(client);
                    continue;
                };
                let table = backends.load_full();
                // Moving a connection to another worker means registering it with that
                // worker's poller instead of this one's.
                let (to, load) = shared.pool.place();
                let held = (permit, load);
                if Pool::current() == Some(to) {
                    tokio::spawn(connection(client, peer, table, shared.clone(), held));
                } else if let Ok(std) = client.into_std() {
                    let on = shared.clone();
                    shared.pool.spawn(to, async move {
                        if let Ok(client) = TcpStream::from_std(std) {
                            connection(client, peer, table, on, held).await;
                        }
                    });
                }
            }
        }
    }
}

/// An accepted connection, on its worker, until it ends.
async fn connection(
    client: TcpStream,
    peer: SocketAddr,
    table: Arc<Backends>,
    shared: Arc<Shared>,
    held: (OwnedSemaphorePermit, Load),
) {
    inc(&shared.stats.tcp_active);
    relay(client, peer, &table, &shared).await;
    dec(&shared.stats.tcp_active);
    drop(held);
}

/// Close with a reset, as the kernel modes answer a Service without endpoints.
fn reset(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

async fn relay(client: TcpStream, peer: SocketAddr, table: &Backends, shared: &Shared) {
    let s = &shared.stats;
    for ep in table.order(peer.ip()) {
        let connect = tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(ep));
        let Ok(Ok(upstream)) = connect.await else {
            inc(&s.tcp_connect_failures);
            continue;
        };
        table.pin(peer.ip(), ep);
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        match super::relay::relay(&client, &upstream, shared.config.tcp_idle_timeout).await {
            Ended::Closed(up, down) => {
                s.bytes_to_endpoints.fetch_add(up, Ordering::Relaxed);
                s.bytes_to_clients.fetch_add(down, Ordering::Relaxed);
            }
            // The endpoint reset (or the client did): the other side learns it the same way.
            Ended::Failed => {
                inc(&s.tcp_reset);
                reset(client);
                reset(upstream);
            }
            Ended::Idle => {
                inc(&s.tcp_idle_closed);
                reset(client);
                reset(upstream);
            }
        }
        return;
    }
    inc(&s.tcp_no_endpoint);
    reset(client);
}
