//! Named packet counters of the kernel's nfnetlink_acct (`-m nfacct --nfacct-name` in
//! iptables rules): created once, read at scrape time. Upstream's iptables mode counts two
//! things with them, the INVALID packets `KUBE-FORWARD` drops and the connections accepted on
//! localhost NodePorts; a rule naming a counter that does not exist is refused by the kernel,
//! so the rules name a counter only after it was created here.
//!
//! The objects are per network namespace, not per IP family: both families' engines ensure
//! the same ones.

use crate::netlink::{self, Msg, Socket, NLM_F_ACK, NLM_F_REQUEST};
use std::io;
use std::time::Duration;

/// `ct_state_invalid_dropped_pkts`: `KUBE-FORWARD`'s INVALID drop.
pub const INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
/// `localhost_nps_accepted_pkts`: new connections to a NodePort on 127.0.0.0/8.
pub const LOCALHOST_NODEPORTS: &str = "localhost_nps_accepted_pkts";

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_ACCT: u16 = 7;
const NFNL_MSG_ACCT_NEW: u16 = 0;
const NFNL_MSG_ACCT_GET: u16 = 1;
const NFACCT_NAME: u16 = 1;
const NFACCT_PKTS: u16 = 2;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
/// The kernel's NFACCT_NAME_MAX, with the terminating NUL.
const NAME_MAX: usize = 32;

fn request(kind: u16, flags: u16, name: &str) -> Vec<u8> {
    let mut m = Msg::new((NFNL_SUBSYS_ACCT << 8) | kind, NLM_F_REQUEST | flags, 1);
    // nfgenmsg: family AF_UNSPEC, version 0, resource id 0.
    m.raw(&[0, 0, 0, 0]);
    m.str_attr(NFACCT_NAME, name);
    m.finish()
}

fn exchange(msg: &[u8]) -> io::Result<Vec<u8>> {
    let sock = Socket::open(NETLINK_NETFILTER, Duration::from_secs(5))?;
    sock.send(msg)?;
    let mut buf = vec![0u8; 4096];
    let n = sock.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= NAME_MAX || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an nfacct name (1-31 bytes)"),
        ));
    }
    Ok(())
}

/// Create the counter `name` unless it exists.
pub fn ensure(name: &str) -> io::Result<()> {
    check_name(name)?;
    let reply = exchange(&request(
        NFNL_MSG_ACCT_NEW,
        NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
        name,
    ))?;
    let msgs = netlink::messages(&reply).map_err(io::Error::other)?;
    match msgs.first().and_then(|m| m.error_code()) {
        Some(0) => Ok(()),
        // error_code gives the errno itself (positive).
        Some(libc::EEXIST) => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(e)),
        None => Err(io::Error::other("nfacct: no acknowledgement")),
    }
}

/// The packets counted by `name` so far; `None` when there is no such counter.
pub fn packets(name: &str) -> io::Result<Option<u64>> {
    check_name(name)?;
    let reply = exchange(&request(NFNL_MSG_ACCT_GET, NLM_F_ACK, name))?;
    let msgs = netlink::messages(&reply).map_err(io::Error::other)?;
    for m in &msgs {
        match m.error_code() {
            Some(libc::ENOENT) => return Ok(None),
            Some(0) => continue,
            Some(e) => return Err(io::Error::from_raw_os_error(e)),
            None => {}
        }
        if m.kind != (NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW || m.payload.len() < 4 {
            continue;
        }
        return parse_packets(&m.payload[4..]).map(Some);
    }
    Err(io::Error::other("nfacct: no counter in the reply"))
}

/// The NFACCT_PKTS attribute (big-endian, as nfnetlink's 64-bit counters are).
fn parse_packets(attrs: &[u8]) -> io::Result<u64> {
    netlink::attrs(attrs)
        .into_iter()
        .find(|(k, _)| *k == NFACCT_PKTS)
        .and_then(|(_, p)| Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?)))
        .ok_or_else(|| io::Error::other("nfacct: the reply has no packet count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_subsystem_and_the_name() {
        let m = request(NFNL_MSG_ACCT_NEW, NLM_F_CREATE, INVALID_DROPPED);
        let (kind, flags) = (
            u16::from_ne_bytes([m[4], m[5]]),
            u16::from_ne_bytes([m[6], m[7]]),
        );
        assert_eq!(kind, 7 << 8);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_CREATE);
        let attrs = netlink::attrs(&m[20..]);
        assert_eq!(
            attrs,
            [(NFACCT_NAME, &b"ct_state_invalid_dropped_pkts\0"[..])]
        );
    }

    #[test]
    fn names_the_kernel_refuses_are_refused_first() {
        for bad in ["", "x".repeat(32).as_str(), "a\0b"] {
            assert!(ensure(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_packet_count_is_read_big_endian() {
        let mut m = Msg::new(0, 0, 0);
        m.str_attr(NFACCT_NAME, "x");
        m.attr(NFACCT_PKTS, &7u64.to_be_bytes());
        let msg = m.finish();
        assert_eq!(parse_packets(&msg[16..]).unwrap(), 7);
        assert!(parse_packets(&msg[16..24]).is_err());
    }
}
