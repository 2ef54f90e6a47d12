//! TCP: accept, connect to an endpoint (the next one on failure), then relay both ways.

use super::balance::Backends;
use super::relay::Ended;
use super::stats::{dec, inc};
use super::workers::{Load, Pool};
use super::Shared;
use arc_swap::ArcSwap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::sync::OwnedSemaphorePermit;

/// Accept connections on `listener` (non-blocking) until told to stop, each relayed on the
/// worker [`Pool::place`] picks.
pub async fn serve(
    listener: AsyncFd<std::net::TcpListener>,
    backends: Arc<ArcSwap<Backends>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = accept(&listener) => {
                let Ok((client, peer)) = accepted else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                inc(&shared.stats.tcp_accepted);
                let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                    inc(&shared.stats.tcp_over_limit);
                    let _ = set_zero_linger(&client);
                    continue;
                };
                let table = backends.load_full();
                let (to, load) = shared.pool.place();
                let on = shared.clone();
                let run = async move {
                    // Registered with the poller of the worker it runs on, once.
                    match TcpStream::from_std(client) {
                        Ok(client) => connection(client, peer, table, on, (permit, load)).await,
                        Err(_) => inc(&on.stats.tcp_reset),
                    }
                };
                if Pool::current() == Some(to) {
                    tokio::spawn(run);
                    // Let the connection start its connect first: the next accept (most often
                    // EAGAIN) then overlaps with the endpoint waking up instead of delaying it.
                    tokio::task::yield_now().await;
                } else {
                    shared.pool.spawn(to, run);
                }
            }
        }
    }
}

/// The next connection, not yet registered with any poller: accepted through tokio's
/// listener, a connection bound for another worker would be registered here, deregistered and
/// registered there (two system calls more).
async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|l| accept4(l.get_ref())) {
            return accepted;
        }
    }
}

/// accept(2) giving a non-blocking socket and its peer in one system call.
fn accept4(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of_val(&addr) as libc::socklen_t;
    // SAFETY: addr and len describe a buffer large enough for any socket address.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = match libc::c_int::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for an AF_INET peer.
            let a: &libc::sockaddr_in =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into()
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for an AF_INET6 peer.
            let a: &libc::sockaddr_in6 =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id).into()
        }
        _ => stream.peer_addr()?,
    };
    Ok((stream, peer))
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
    let _ = set_zero_linger(&client);
    drop(client);
}

/// Make closing `s` send a reset instead of a FIN (SO_LINGER of zero), for sockets tokio
/// does not hold yet as well as those it does.
pub(super) fn set_zero_linger(s: &impl AsRawFd) -> io::Result<()> {
    let off = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket, with a linger of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&off as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer accept4 reports is the client's own address (affinity keys on it), for both
    /// families.
    #[test]
    fn accept4_gives_a_nonblocking_socket_and_the_clients_address() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(host).unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, peer) = accept4(&listener).unwrap();
            assert_eq!(peer, client.local_addr().unwrap(), "{host}");
            assert_eq!(accepted.peer_addr().unwrap(), peer, "{host}");
            let mut buf = [0u8; 1];
            let err = std::io::Read::read(&mut &accepted, &mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{host}");
        }
    }
}
