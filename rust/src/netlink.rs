//! Netlink framing shared by the nfnetlink element path and the IPVS client: building
//! messages and attributes, walking replies, and a socket closed on drop.
//!
//! Integers are host order unless a protocol says otherwise (ports, for instance); every
//! message and attribute is padded to 4 bytes.

use std::io;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;
pub const NLA_F_NESTED: u16 = 0x8000;
/// The flag bits of an attribute's type.
const NLA_TYPE_MASK: u16 = !0xC000;

/// A netlink message under construction.
pub struct Msg(Vec<u8>);

impl Msg {
    /// The 16-byte message header; the protocol's own header follows with [`Msg::raw`].
    pub fn new(kind: u16, flags: u16, seq: u32) -> Msg {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        Msg(b)
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn pad(&mut self) {
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = (4 + payload.len()) as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.pad();
    }

    pub fn u16_attr(&mut self, kind: u16, v: u16) {
        self.attr(kind, &v.to_ne_bytes());
    }

    pub fn u32_attr(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_ne_bytes());
    }

    /// A NUL-terminated string.
    pub fn str_attr(&mut self, kind: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }

    /// Open a nested attribute (`kind` carries NLA_F_NESTED if the protocol wants it);
    /// close it with [`Msg::end`].
    pub fn begin(&mut self, kind: u16) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        at
    }

    pub fn end(&mut self, at: usize) {
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// One message of a reply datagram.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the 16-byte header.
    pub payload: &'a [u8],
}

impl Reply<'_> {
    /// For an NLMSG_ERROR message: the errno it carries (0 for an acknowledgement).
    pub fn error_code(&self) -> Option<i32> {
        if self.kind != NLMSG_ERROR || self.payload.len() < 4 {
            return None;
        }
        let p = self.payload;
        Some(i32::from_ne_bytes([p[0], p[1], p[2], p[3]]).saturating_neg())
    }
}

/// The messages of one datagram, or `Err` at the first whose length does not fit (nothing
/// past it can be trusted).
pub fn messages(reply: &[u8]) -> std::result::Result<Vec<Reply<'_>>, String> {
    let word =
        |at: usize| u32::from_ne_bytes([reply[at], reply[at + 1], reply[at + 2], reply[at + 3]]);
    let mut out = Vec::new();
    let mut at = 0;
    while reply.len() - at >= 16 {
        let len = word(at) as usize;
        if len < 16 || len > reply.len() - at {
            return Err(format!("malformed reply at byte {at}"));
        }
        out.push(Reply {
            kind: u16::from_ne_bytes([reply[at + 4], reply[at + 5]]),
            flags: u16::from_ne_bytes([reply[at + 6], reply[at + 7]]),
            seq: word(at + 8),
            payload: &reply[at + 16..at + len],
        });
        // Messages are 4-byte aligned; the last one may end without padding.
        at = at.saturating_add((len + 3) & !3).min(reply.len());
    }
    Ok(out)
}

/// The attributes in `data` as (type without flag bits, payload); stops at the first that
/// does not fit.
pub fn attrs(data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while data.len() - at >= 4 {
        let len = u16::from_ne_bytes([data[at], data[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([data[at + 2], data[at + 3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() - at {
            break;
        }
        out.push((kind, &data[at + 4..at + len]));
        at = at.saturating_add((len + 3) & !3).min(data.len());
    }
    out
}

pub fn get_u16(p: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(p.get(..2)?.try_into().ok()?))
}

pub fn get_u32(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

/// A netlink socket, closed on drop.
pub struct Socket(i32);

fn setsockopt<T>(fd: i32, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt with a valid pointer to a value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Socket {
    /// A socket for `protocol` (NETLINK_NETFILTER, NETLINK_GENERIC, ...) whose receives give
    /// up after `timeout`: a reply that never comes must not hang a sync.
    pub fn open(protocol: i32, timeout: std::time::Duration) -> io::Result<Socket> {
        // SAFETY: plain socket(2); the descriptor is owned by the returned value.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = Socket(fd);
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        Ok(s)
    }

    /// Room for many replies at once: a batch's acknowledgements all arrive before the first
    /// is read. Forcing needs CAP_NET_ADMIN; without it the ordinary limit applies.
    pub fn grow_receive_buffer(&self, bytes: i32) {
        if setsockopt(self.0, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes).is_err() {
            let _ = setsockopt(self.0, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes);
        }
    }

    /// Error acknowledgements without a copy of the request (NETLINK_CAP_ACK).
    pub fn short_acks(&self) {
        let on: i32 = 1;
        let _ = setsockopt(self.0, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, &on);
    }

    pub fn send(&self, data: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl zeroed is a valid address for the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and address are valid for the call's duration.
        let rc = unsafe {
            libc::sendto(
                self.0,
                data.as_ptr().cast(),
                data.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc as usize != data.len() {
            return Err(io::Error::other("short send"));
        }
        Ok(())
    }

    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for writes of its length.
        let rc = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe {
            libc::close(self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_round_trip() {
        let mut m = Msg::new(0x24, NLM_F_REQUEST | NLM_F_ACK, 7);
        m.raw(&[1, 1, 0, 0]);
        let nest = m.begin(1);
        m.u16_attr(1, 2);
        m.str_attr(6, "rr");
        m.end(nest);
        let bytes = m.finish();
        assert_eq!(bytes.len() % 4, 0);
        let msgs = messages(&bytes).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].kind, msgs[0].seq), (0x24, 7));
        let top = attrs(&msgs[0].payload[4..]);
        assert_eq!(top.len(), 1);
        let inner = attrs(top[0].1);
        assert_eq!(inner, vec![(1, &2u16.to_ne_bytes()[..]), (6, &b"rr\0"[..])]);
    }

    #[test]
    fn a_length_past_the_end_is_an_error_not_a_panic() {
        let mut bytes = Msg::new(2, 0, 1).finish();
        bytes[0] = 200;
        assert!(messages(&bytes).is_err());
        assert!(attrs(&[8, 0, 1, 0, 1]).is_empty());
    }
}
