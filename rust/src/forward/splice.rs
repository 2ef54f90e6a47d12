//! Zero-copy TCP relay: bytes move socket -> pipe -> socket inside the kernel (`splice(2)`),
//! never through user-space buffers. One pipe per direction; half-close is passed on.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (the pipe's default capacity).
const CHUNK: usize = 64 * 1024;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and belong to nobody else.
        Ok(unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between descriptors we hold open; null offsets (sockets and pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Move everything `from` sends to `to` until `from` closes its sending side, then shut down
/// `to`'s sending side. Returns the bytes moved.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // SAFETY: shutdown on a socket we hold open.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => {
                    left -= m;
                    total += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A pipe per direction; `Err` when none can be made (descriptor limit): copy instead.
pub fn pipes() -> io::Result<(Pipe, Pipe)> {
    Ok((Pipe::new()?, Pipe::new()?))
}

/// Relay both ways until both sides have closed: (bytes to `b`, bytes to `a`). An error in
/// either direction (a reset) ends both, as a copying relay would.
pub async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    (up, down): (Pipe, Pipe),
) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, &up), one_way(b, a, &down))
}
